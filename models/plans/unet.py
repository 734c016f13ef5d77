"""The plan for diffusers' ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL).

* ``conv_in`` -> ``first_conv`` (``conv_in.0`` in a :class:`.positional_unet.
  PositionalUNet2DConditionModel`, whose ``conv_in.1``, the learnt position embedding, ->
  ``position_embedding``); every other ``Conv2d`` with a kernel taller than one row ->
  ``halo_conv`` (resnet convolutions, down-samplers, up-samplers, ``conv_out``);
* every ``GroupNorm`` -> ``group_norm`` (resnets, transformer blocks' input norm, spatial
  attention blocks, ``conv_norm_out``);
* every self-attention ``Attention`` (``attn1`` of transformer blocks, spatial attention
  blocks) -> ``self_attention``; cross-attention and linear layers are per token and stay.

Strips align to ``2 ** d`` latent rows for ``d`` down-samplings.
"""

from __future__ import annotations

from torch import nn

from .base import LayerRule, ModelPlan, UnsupportedModelError

__all__ = ["unet_plan"]


def unet_plan(unet: nn.Module) -> ModelPlan:
    """Build the plan for a ``UNet2DConditionModel`` (or a ``UNet2DModel``)."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D

    from ..positional_unet import LearntPositionEmbedding

    config = unet.config
    if getattr(config, "center_input_sample", False):
        raise UnsupportedModelError("UNets with center_input_sample=True are not supported (conv_in's input is not the latent)")
    rules: list[LayerRule] = []
    for path, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D) and (module.up or module.down):
            raise UnsupportedModelError(f"{path}: resnets that resample inside (up/down=True) are not supported yet")
        if isinstance(module, Downsample2D):
            if module.use_conv and module.padding == 0:
                raise UnsupportedModelError(f"{path}: asymmetric-padding down-samplers (padding=0) are not supported yet")
        if isinstance(module, LearntPositionEmbedding):
            if path != "conv_in.1":
                raise UnsupportedModelError(f"{path}: a position embedding is supported only right after conv_in (conv_in.1)")
            rules.append(LayerRule(path, "position_embedding"))
        elif isinstance(module, nn.Conv2d):
            if path in ("conv_in", "conv_in.0"):  # conv_in.0: conv_in is (conv, position embedding)
                rules.append(LayerRule(path, "first_conv"))
            elif module.kernel_size[0] > 1:
                rules.append(LayerRule(path, "halo_conv"))
        elif isinstance(module, nn.GroupNorm):
            rules.append(LayerRule(path, "group_norm"))
        elif isinstance(module, Attention) and not module.is_cross_attention:
            if getattr(module, "added_kv_proj_dim", None) is not None:
                raise UnsupportedModelError(f"{path}: attention with added key/value projections is not supported yet")
            rules.append(LayerRule(path, "self_attention"))
    if not any(rule.kind == "first_conv" for rule in rules):
        raise UnsupportedModelError("the UNet has no conv_in; is this a UNet2DConditionModel?")
    # Down-sampling blocks in sequence: the deepest level sees height / 2**d rows.
    levels = sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
    return ModelPlan(
        family="sd-unet",
        alignment=2**levels,
        layers=tuple(rules),
        output_channels=int(config.out_channels),
    )
