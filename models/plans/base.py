"""A model plan: which modules of a model get which displaced layer -- data, not code.

A plan lists module paths with a layer kind; :func:`pcpp_runtime.apply.apply_plan` turns each
entry into the strip-local layer and can remove them again. One file per model family builds
its plan (:mod:`.unet`, :mod:`.dit`); the engine never matches class names itself.

Kinds:
    ``first_conv``     the first convolution (input is the latent every rank holds)
    ``halo_conv``      a k x k convolution, k > 1, that needs neighbour rows
    ``group_norm``     group normalization over the whole image
    ``self_attention`` a self-attention layer (an ``Attention`` module; gets a processor)
    ``patch_embed``    a DiT patch embedding (first layer: strip of the latent every rank holds,
                       plus the strip's rows of the full image's positional embedding)
    ``position_embedding`` a learnt table added to a UNet's ``conv_in`` output (the strip's rows
                       of the table for the full latent; no messages)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["LAYER_KINDS", "LayerRule", "ModelPlan", "UnsupportedModelError"]

LAYER_KINDS = ("first_conv", "halo_conv", "group_norm", "self_attention", "patch_embed", "position_embedding")


class UnsupportedModelError(ValueError):
    """The model (or one of its modules) cannot be split; the message says why and what works."""


@dataclasses.dataclass(frozen=True)
class LayerRule:
    path: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r} for {self.path}; kinds: {', '.join(LAYER_KINDS)}")


@dataclasses.dataclass(frozen=True)
class ModelPlan:
    """How one model is split.

    Attributes:
        family: the family name (``sd-unet``, ...).
        alignment: strip boundaries are multiples of this many latent rows.
        layers: the displaced layers, in module order (their index + 1 is the layer id on
            every rank).
        output_channels: channels of the denoiser's output (the output gather's buffers and the
            byte formulas; ``2 * C`` for transformers that also predict a variance).
        strip_forward: for a model whose own ``forward`` cannot run on a strip, a replacement
            ``forward(model, *args, **kwargs)`` that can (DiT's assumes a square token grid when
            it unpatchifies); installed while the plan is applied, so with one rank, or after
            ``remove()``, the model's own ``forward`` runs. ``None`` for most families.
    """

    family: str
    alignment: int
    layers: tuple[LayerRule, ...]
    output_channels: int
    strip_forward: Callable[..., Any] | None = None

    def paths(self, kind: str) -> list[str]:
        return [rule.path for rule in self.layers if rule.kind == kind]
