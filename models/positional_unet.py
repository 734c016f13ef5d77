"""A ``UNet2DConditionModel`` that knows where it is: a learnt position embedding after ``conv_in``.

Stable Diffusion's UNet has no position encoding: attention is permutation-invariant and a
convolution learns where it is only from the zero padding at the image border. Trained from
scratch on a CPU budget, the demo UNet never tied the caption's place words ("at the top
left") to positions that way; with a learnt embedding added to ``conv_in``'s output it did so
within 300 steps (docs/MODELS.md, "The UNet cannot learn the place words from zero padding").
diffusers' UNet has no option for that, hence this subclass.

``conv_in`` becomes ``nn.Sequential(conv, LearntPositionEmbedding)``, so the engine's plan
(:mod:`.unet`) splits ``conv_in.0`` as the first convolution and gives ``conv_in.1`` each strip's
rows of the full image's embedding (:mod:`pcpp_runtime.layers.position_embedding`).

Loading: ``save_pretrained`` names this module, ``pcpp_runtime.models.positional_unet``, as the
UNet's library in ``model_index.json``, and ``StableDiffusionPipeline.from_pretrained`` imports
the class from it, so a saved pipeline loads like any checkpoint wherever pcpp-runtime is
installed.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
# ModelMixin is imported for diffusers' loader: it picks a component's load method by testing the
# class against base classes looked up by name in the component's library, which is this module
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401
from torch import nn

__all__ = ["LearntPositionEmbedding", "PositionalUNet2DConditionModel", "sine_table"]


def sine_table(channels: int, height: int, width: int) -> torch.Tensor:
    """2-D sines and cosines ``(1, channels, height, width)``: the first half of the channels
    vary with the row, the second half with the column, each half in ``channels / 4``
    frequencies of sine and cosine whose wavelengths run geometrically from twice the side down
    to 4 positions (shorter waves alias on a grid of this size)."""
    if channels % 4:
        raise ValueError(f"a sine table needs channels divisible by 4, got {channels}")
    count = channels // 4

    def waves(size: int) -> torch.Tensor:  # (2 * count, size)
        longest, shortest = 2.0 * size, 4.0
        ratio = (shortest / longest) ** (1.0 / max(count - 1, 1))
        wavelengths = longest * ratio ** torch.arange(count, dtype=torch.float64)
        angles = (torch.arange(size, dtype=torch.float64)[None] + 0.5) * (2 * math.pi / wavelengths[:, None])
        return torch.cat([angles.sin(), angles.cos()]).float()

    rows = waves(height)[:, :, None].expand(-1, -1, width)
    cols = waves(width)[:, None, :].expand(-1, height, -1)
    return torch.cat([rows, cols])[None].contiguous()


class LearntPositionEmbedding(nn.Module):
    """Adds a learnt table ``(1, C, H, W)`` to its input ``(B, C, h, w)``.

    At the table's own size it is added as is; for another latent size it is resized
    bilinearly to ``(h, w)`` first (:meth:`table_for`), so the model runs at any resolution.
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.table = nn.Parameter(sine_table(channels, height, width))

    def table_for(self, height: int, width: int) -> torch.Tensor:
        """The embedding for a ``height x width`` input: ``(1, C, height, width)``."""
        if self.table.shape[-2:] == (height, width):
            return self.table
        return F.interpolate(self.table, size=(height, width), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table_for(x.shape[2], x.shape[3]).to(x.dtype)


class PositionalUNet2DConditionModel(UNet2DConditionModel):
    """``UNet2DConditionModel`` with a :class:`LearntPositionEmbedding` of ``sample_size`` squared
    positions added to ``conv_in``'s output. Same config and ``forward`` as the parent."""

    def __init__(self, **config) -> None:
        super().__init__(**config)
        side = self.config.sample_size
        height, width = (side, side) if isinstance(side, int) else tuple(side)
        self.conv_in = nn.Sequential(self.conv_in, LearntPositionEmbedding(self.conv_in.out_channels, height, width))

    # diffusers builds the model from its config by this signature (ConfigMixin.extract_init_dict):
    # the parent's, since the subclass adds no option of its own
    __init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__)
