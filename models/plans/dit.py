"""Plans for diffusion transformers: ``DiTTransformer2DModel`` (DiT) and
``PixArtTransformer2DModel`` (PixArt-alpha and PixArt-sigma).

Both cut the latent into ``p x p`` patches and run a stack of transformer blocks on the tokens
(row-major over the patch grid):

* ``pos_embed`` (a ``PatchEmbed``) -> ``patch_embed``: the strip's patches plus the strip's rows
  of the full image's positional embedding;
* ``attn1`` of every block (self-attention) -> ``self_attention``: one token per ``p x p``
  latent patch, so the attention layer's resolution factor is ``p``;
* cross-attention (PixArt's ``attn2``), feed-forward, layer norms and the adaptive norms
  (per-sample timestep/class/resolution embeddings broadcast over tokens) are per token and stay.

Strips align to ``p`` latent rows. The output has ``out_channels`` channels -- ``2 * C`` for
checkpoints that also predict a variance ("learned sigma"); the pipeline splits it after the
gather.

DiT's own ``forward`` unpatchifies with ``height = width = sqrt(tokens)``, true only for a
square token grid, never for a strip; the DiT plan therefore carries :func:`dit_strip_forward`,
the same computation with the grid taken from the input's shape (as PixArt's forward already
does). PixArt needs no replacement.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerRule, ModelPlan, UnsupportedModelError

__all__ = ["dit_plan", "dit_strip_forward", "pixart_plan"]


def _transformer_rules(model: nn.Module) -> list[LayerRule]:
    """``patch_embed`` for ``pos_embed``, ``self_attention`` for every self-attention layer;
    refuses modules that would mix positions without a displaced layer."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import PatchEmbed

    if not isinstance(getattr(model, "pos_embed", None), PatchEmbed):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no PatchEmbed `pos_embed`; is it a patched (continuous) transformer?"
        )
    rules = [LayerRule("pos_embed", "patch_embed")]
    for path, module in model.named_modules():
        if path.startswith("pos_embed"):
            continue
        if isinstance(module, (nn.Conv2d, nn.GroupNorm)):
            raise UnsupportedModelError(f"{path}: a {type(module).__name__} inside a transformer plan is not supported yet")
        if isinstance(module, Attention) and not module.is_cross_attention:
            if getattr(module, "added_kv_proj_dim", None) is not None:
                raise UnsupportedModelError(f"{path}: attention with added key/value projections is not supported yet")
            rules.append(LayerRule(path, "self_attention"))
    return rules


def _transformer_plan(
    model: nn.Module, family: str, strip_forward: Callable[..., Any] | None = None
) -> ModelPlan:
    """The plan of a patched transformer: strips align to its patch size; ``strip_forward``
    replaces a ``forward`` that cannot run on a strip."""
    return ModelPlan(
        family=family,
        alignment=int(model.config.patch_size),
        layers=tuple(_transformer_rules(model)),
        output_channels=int(model.out_channels),
        strip_forward=strip_forward,
    )


def dit_plan(model: nn.Module) -> ModelPlan:
    """The plan for a ``DiTTransformer2DModel`` (class-conditional DiT)."""
    return _transformer_plan(model, "dit", strip_forward=dit_strip_forward)


def pixart_plan(model: nn.Module) -> ModelPlan:
    """The plan for a ``PixArtTransformer2DModel`` (PixArt-alpha, PixArt-sigma)."""
    return _transformer_plan(model, "pixart")


def dit_strip_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.LongTensor | None = None,
    class_labels: torch.LongTensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    return_dict: bool = True,
):
    """``DiTTransformer2DModel.forward`` (diffusers 0.3x-0.4x) for a strip ``(B, C, h, W)``.

    Step for step the library's computation -- patch embedding, the blocks, the final adaptive
    norm and projection -- except that unpatchify uses the input's ``h/p x W/p`` patch grid
    instead of ``sqrt(tokens)`` on both sides. The sync-equals-one-worker tests guard the copy
    against drift in the library. Inference only (no gradient checkpointing).
    """
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    patch = self.patch_size
    height, width = hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
    hidden_states = self.pos_embed(hidden_states)
    for block in self.transformer_blocks:
        hidden_states = block(
            hidden_states,
            attention_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            timestep=timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            class_labels=class_labels,
        )
    conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    hidden_states = self.norm_out(hidden_states) * (1 + scale[:, None]) + shift[:, None]
    hidden_states = self.proj_out_2(hidden_states)
    # unpatchify on the strip's own grid
    hidden_states = hidden_states.reshape(-1, height, width, patch, patch, self.out_channels)
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    output = hidden_states.reshape(-1, self.out_channels, height * patch, width * patch)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)
