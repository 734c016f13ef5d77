"""Conditioning policies: what remote context each rank uses, per layer and per step.

A policy answers three questions; the engine does all communication and assembly:

* :meth:`ConditioningPolicy.synchronous` -- is this step exact (fresh context from every rank,
  blocking)? The engine also makes the first ``warmup_steps`` steps synchronous.
* :meth:`ConditioningPolicy.attention_rows` -- at a displaced step, which rows of which peers'
  strips a self-attention layer attends to (their keys and values from the previous step). Only
  those rows are sent, so fewer rows means fewer bytes.
* :attr:`ConditioningPolicy.global_norm` -- whether group norm uses corrected whole-image
  statistics (stale for other ranks, fresh for this one) or this strip's own statistics.

Halo rows of k x k convolutions are always exchanged with the two neighbours (stale at displaced
steps), since a convolution without them is wrong at the boundary whatever the policy.

A researcher's policy is a small subclass registered by name::

    from pcpp_runtime import PartialPolicy, register_policy

    @register_policy("growing")
    class GrowingPortion(PartialPolicy):
        def portion_at(self, layer, step):
            return 0.1 + 0.4 * step / max(1, layer.num_steps - 1)
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from .partition import Strips
from .registry import policies

if TYPE_CHECKING:
    from .config import ParallelConfig

__all__ = [
    "AttentionLayerView",
    "ConditioningPolicy",
    "FullPolicy",
    "NoContextPolicy",
    "PartialPolicy",
    "SyncPolicy",
    "portion_rows",
    "register_policy",
]

#: ``{peer rank: (first row, end row)}`` within the peer's strip at the layer's resolution.
RowRequest = dict[int, tuple[int, int]]


def register_policy(name: str):
    """Class decorator: make a policy available as ``--policy name``."""
    return policies.register(name)


def portion_rows(portion: float, rows: int) -> int:
    """How many of a strip's ``rows`` a portion p covers: p * rows rounded half up, at least 1."""
    return min(rows, max(1, math.floor(portion * rows + 0.5)))


@dataclasses.dataclass(frozen=True)
class AttentionLayerView(Strips):
    """What a policy may know about one self-attention layer on one rank.

    Attributes:
        layer_id: index of the displaced layer (same on every rank).
        path: the module path in the model, e.g. ``down_blocks.1.attentions.0...attn1``.
        rank: the rank that asks (the receiver).
        bounds: every rank's strip at this layer's resolution, ``(start, end)`` rows.
        width: tokens per row at this resolution.
        num_steps: denoiser calls in this generation.
    """

    layer_id: int
    path: str
    rank: int
    bounds: tuple[tuple[int, int], ...]
    width: int
    num_steps: int

    def strip_rows(self, rank: int) -> int:
        """Rows of rank ``rank``'s strip at this layer's resolution (:meth:`~.Strips.rows`)."""
        return self.rows(rank)


class ConditioningPolicy:
    """Base class. Subclasses set the class attributes and override :meth:`attention_rows`."""

    #: True if displaced steps read the previous step's context (needs warm-up >= 1).
    uses_stale_context: bool = True
    #: True: corrected whole-image group-norm statistics; False: the strip's own.
    global_norm: bool = True

    def __init__(self, config: "ParallelConfig") -> None:
        self.config = config

    def synchronous(self, step: int, num_steps: int) -> bool:
        """True if ``step`` must run with fresh context from every rank (besides warm-up)."""
        return False

    def attention_rows(self, layer: AttentionLayerView, step: int) -> RowRequest:
        """Rows of other ranks' strips that ``layer.rank`` attends to at displaced ``step``."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


@register_policy("sync")
class SyncPolicy(ConditioningPolicy):
    """Exact: fresh context from every rank at every step. Must equal one device."""

    uses_stale_context = False

    def synchronous(self, step: int, num_steps: int) -> bool:
        return True

    def attention_rows(self, layer: AttentionLayerView, step: int) -> RowRequest:  # pragma: no cover
        raise AssertionError("sync never runs a displaced step")


@register_policy("full")
class FullPolicy(ConditioningPolicy):
    """DistriFusion: stale keys and values of every other strip, stale halos, corrected stats."""

    def attention_rows(self, layer: AttentionLayerView, step: int) -> RowRequest:
        return {peer: (0, layer.strip_rows(peer)) for peer in range(layer.world_size) if peer != layer.rank}


@register_policy("partial")
class PartialPolicy(ConditioningPolicy):
    """PCPP: stale keys and values of the ``portion`` of each neighbour's rows nearest the
    boundary (its last rows for the rank above, its first rows for the rank below); strips
    further away are not attended."""

    def portion_at(self, layer: AttentionLayerView, step: int) -> float:
        """The portion used at ``step``; constant ``config.portion`` here, override to vary it."""
        return self.config.portion

    def attention_rows(self, layer: AttentionLayerView, step: int) -> RowRequest:
        portion = self.portion_at(layer, step)
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"{self.describe()}: portion at step {step} must be in (0, 1], got {portion}")
        rank = layer.rank
        rows: RowRequest = {}
        if rank > 0:
            above = layer.strip_rows(rank - 1)
            rows[rank - 1] = (above - portion_rows(portion, above), above)
        if rank < layer.world_size - 1:
            below = layer.strip_rows(rank + 1)
            rows[rank + 1] = (0, portion_rows(portion, below))
        return rows


@register_policy("none")
class NoContextPolicy(ConditioningPolicy):
    """Naive patch parallelism: own strip only in attention, local group-norm statistics
    (halos are still exchanged, stale)."""

    global_norm = False

    def attention_rows(self, layer: AttentionLayerView, step: int) -> RowRequest:
        return {}
