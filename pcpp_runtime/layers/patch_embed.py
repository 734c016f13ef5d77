"""Patch embedding over a strip: the first layer of a DiT-style transformer.

diffusers' ``PatchEmbed`` cuts the latent into ``p x p`` patches with a stride-``p`` convolution
(no padding, so no halo), flattens them to tokens in row-major order, and adds a positional
embedding computed for the grid it is given. Given a strip, it would compute the embedding of a
strip-sized grid -- wrong positions, and for sin-cos embeddings rescaled ones. This layer
projects the strip (exact: strip boundaries are multiples of ``p``, the plan's alignment) and
adds the strip's rows of the *full* image's positional embedding, computed exactly as the
unsplit module computes it for the full latent (stored table, recomputed sin-cos grid, or SD3's
centre crop). No messages: every rank holds the full latent's shape.

Shapes: input ``(B, C, h, W)`` -- this rank's strip of latent rows ``[start, end)``; output
``(B, (h / p) * (W / p), D)`` tokens, row-major over the strip's patch grid.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import RankRuntime
from .base import DisplacedModule

__all__ = ["StripPatchEmbed", "full_pos_embed"]


def full_pos_embed(embed: nn.Module, height: int, width: int, device: torch.device) -> torch.Tensor | None:
    """The positional embedding ``embed`` (a diffusers ``PatchEmbed``) adds for a ``height x
    width`` latent: ``(1, (height / p) * (width / p), D)``, or ``None`` when it adds none. Mirrors
    ``PatchEmbed.forward`` branch for branch, so the values are the unsplit model's."""
    if embed.pos_embed is None:
        return None
    if embed.pos_embed_max_size:  # SD3-style: a centre crop of a stored table (takes latent rows)
        return embed.cropped_pos_embed(height, width)
    rows, cols = height // embed.patch_size, width // embed.patch_size
    if embed.height == rows and embed.width == cols:
        return embed.pos_embed
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    table = get_2d_sincos_pos_embed(
        embed_dim=embed.pos_embed.shape[-1],
        grid_size=(rows, cols),
        base_size=embed.base_size,
        interpolation_scale=embed.interpolation_scale,
        device=device,
        output_type="pt",
    )
    return table.float().unsqueeze(0)


class StripPatchEmbed(DisplacedModule):
    """A ``PatchEmbed`` applied to this rank's strip, with the full image's positions."""

    kind = "patch_embed"

    def __init__(self, embed: nn.Module, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        proj = getattr(embed, "proj", None)
        patch = getattr(embed, "patch_size", None)
        if not isinstance(proj, nn.Conv2d) or patch is None:
            raise ValueError(f"{path} is not a diffusers PatchEmbed (a Conv2d `proj` and a `patch_size`)")
        if tuple(proj.kernel_size) != (patch, patch) or tuple(proj.stride) != (patch, patch) or proj.padding != (0, 0):
            raise ValueError(
                f"{path}: the patch projection must be a {patch}x{patch} convolution with stride {patch} and no padding"
            )
        if not embed.flatten:
            raise ValueError(f"{path}: patch embeddings that do not flatten to tokens are not supported")
        self.embed = embed
        self.patch_size = patch
        self._pos: torch.Tensor | None = None

    def _register(self, device: torch.device) -> None:
        """Compute the full image's positional embedding once per generation shape."""
        plan = self.runtime.plan
        self._pos = full_pos_embed(self.embed, plan.height, plan.width, device)
        self.mark_registered()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        start, end = runtime.bounds
        patch = self.patch_size
        if x.shape[2] != end - start or start % patch or end % patch:
            raise RuntimeError(
                f"{self.path}: got {x.shape[2]} rows for the strip [{start}, {end}); strips must be this rank's rows, "
                f"aligned to the patch size {patch} (the plan's alignment is wrong)"
            )
        if self.needs_registration():
            self._register(x.device)
        embed = self.embed
        tokens = embed.proj(x).flatten(2).transpose(1, 2)  # (B, h/p * W/p, D)
        if embed.layer_norm:
            tokens = embed.norm(tokens)
        if self._pos is None:
            return tokens.to(tokens.dtype)
        cols = runtime.plan.width // patch
        pos = self._pos[:, (start // patch) * cols : (end // patch) * cols]
        return (tokens + pos).to(tokens.dtype)
