"""A learnt position embedding over a strip: each rank adds its own rows of the full table.

:class:`~pcpp_runtime.models.positional_unet.LearntPositionEmbedding` adds a table
``(1, C, H, W)`` to ``conv_in``'s output, resized to the latent's size when that differs. Given a
strip it would resize the table to the strip's size -- every strip would get the whole image's
positions squeezed into its rows. This layer computes the table for the *full* latent (the plan's
height and width), exactly as the unsplit module does, and adds rows ``[start, end)``. No
messages: the table is a parameter every rank holds.

Shapes: input ``(B, C, h, W)`` -- this rank's strip of ``conv_in``'s output, latent rows
``[start, end)`` (``conv_in`` has stride 1); output the same shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import RankRuntime
from .base import DisplacedModule

__all__ = ["StripPositionEmbedding"]


class StripPositionEmbedding(DisplacedModule):
    """A ``LearntPositionEmbedding`` applied to this rank's strip, with the full image's positions."""

    kind = "position_embedding"

    def __init__(self, embed: nn.Module, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        if not callable(getattr(embed, "table_for", None)):
            raise ValueError(f"{path} is not a LearntPositionEmbedding (it has no table_for(height, width))")
        self.embed = embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start, end = self.runtime.bounds
        plan = self.runtime.plan
        if x.shape[2] != end - start or x.shape[3] != plan.width:
            raise RuntimeError(
                f"{self.path}: got a {x.shape[2]} x {x.shape[3]} input for the strip of rows [{start}, {end}) of a "
                f"{plan.height} x {plan.width} latent; the position embedding must follow conv_in, at latent resolution"
            )
        table = self.embed.table_for(plan.height, plan.width)
        return x + table[:, :, start:end].to(x.dtype)
