"""Partitioners: which latent rows each rank owns.

A :class:`PatchPlan` gives every rank one strip of latent rows ``[start, end)``. Strip boundaries
are multiples of ``alignment`` (2**d for a UNet with d down-samplings, the patch size for a DiT),
so they line up at every resolution the model reaches; strips may differ in height.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .config import ConfigError
from .registry import partitioners

__all__ = [
    "PatchPlan",
    "Partitioner",
    "RowPartitioner",
    "ShapeError",
    "Strips",
    "WeightedRowPartitioner",
    "check_splittable",
]


class ShapeError(ConfigError):
    """A latent shape cannot be split as asked; the message says what would work."""


def check_splittable(
    name: str, size: int, step: int, strips: int, *, unit: str, step_means: str, ranks_per_strip: int = 1
) -> None:
    """Raise :class:`ShapeError` unless ``size`` is a multiple of ``step`` that holds at least
    ``strips`` steps, naming the nearest sizes that work or the most ranks that do.

    The same check serves latent rows (step: the model's alignment) and pixels (step: the VAE
    factor times the alignment); ``ranks_per_strip`` is 2 with CFG parallel (two rank groups).
    """
    if size % step:
        lower = (size // step) * step
        raise ShapeError(
            f"{name} {size} {unit} is not a multiple of {step} {unit} ({step_means}); "
            f"nearest that work: {lower or step} or {lower + step} {unit}"
        )
    units = size // step
    if units < strips:
        raise ShapeError(
            f"{name} {size} {unit} gives only {units} strip(s) of {step} {unit} ({step_means}), too few for "
            f"{strips} strips: use a {name} of at least {strips * step} {unit} or at most {units * ranks_per_strip} rank(s)"
        )


class Strips:
    """What every holder of ``bounds`` -- ``bounds[r] = (start, end)``, rank r's rows -- can say."""

    bounds: tuple[tuple[int, int], ...]

    @property
    def world_size(self) -> int:
        """The number of strips, one per rank."""
        return len(self.bounds)

    def rows(self, rank: int) -> int:
        """The height of rank ``rank``'s strip."""
        start, end = self.bounds[rank]
        return end - start


@dataclasses.dataclass(frozen=True)
class PatchPlan(Strips):
    """Strips of latent rows, one per rank.

    Attributes:
        height, width: the latent's spatial size (rows, columns).
        alignment: every boundary is a multiple of this many latent rows.
        bounds: ``bounds[r] = (start, end)``, rank r's latent rows; contiguous, in rank order.
    """

    height: int
    width: int
    alignment: int
    bounds: tuple[tuple[int, int], ...]

    def level_bounds(self, factor: int) -> tuple[tuple[int, int], ...]:
        """Bounds at a resolution ``factor`` times coarser than the latent (factor divides alignment)."""
        if self.alignment % factor:
            raise ValueError(f"resolution factor {factor} does not divide the plan's alignment {self.alignment}")
        return tuple((s // factor, e // factor) for s, e in self.bounds)

    def neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """(rank above, rank below); ``None`` at the image edge."""
        above = rank - 1 if rank > 0 else None
        below = rank + 1 if rank < self.world_size - 1 else None
        return above, below


class Partitioner:
    """Base class of partitioners; subclasses implement :meth:`split_units`."""

    def plan(
        self, height: int, width: int, world_size: int, alignment: int, weights: Sequence[float] | None = None
    ) -> PatchPlan:
        """Split ``height`` latent rows over ``world_size`` ranks in multiples of ``alignment``.

        Raises :class:`ShapeError` before any compute if the shape cannot be split, naming the
        nearest shapes or the largest world size that would work.
        """
        check_splittable(
            "latent height", height, alignment, world_size, unit="rows", step_means="the model's coarsest level"
        )
        units = height // alignment
        counts = self.split_units(units, world_size, weights)
        if len(counts) != world_size or sum(counts) != units or min(counts) < 1:
            raise ShapeError(f"{type(self).__name__} produced an invalid split {counts} of {units} units")
        bounds = []
        start = 0
        for count in counts:
            bounds.append((start, start + count * alignment))
            start += count * alignment
        return PatchPlan(height, width, alignment, tuple(bounds))

    def split_units(self, units: int, world_size: int, weights: Sequence[float] | None) -> list[int]:
        raise NotImplementedError


@partitioners.register("rows")
class RowPartitioner(Partitioner):
    """Equal strips; when ``units`` does not divide evenly the first ranks get one unit more."""

    def split_units(self, units: int, world_size: int, weights: Sequence[float] | None) -> list[int]:
        base, extra = divmod(units, world_size)
        return [base + (1 if r < extra else 0) for r in range(world_size)]


@partitioners.register("weighted")
class WeightedRowPartitioner(Partitioner):
    """Strips proportional to ``weights`` (largest-remainder rounding, at least one unit each)."""

    def split_units(self, units: int, world_size: int, weights: Sequence[float] | None) -> list[int]:
        if weights is None:
            return RowPartitioner().split_units(units, world_size, None)
        total = float(sum(weights))
        spare = units - world_size  # every rank gets one unit first
        exact = [spare * w / total for w in weights]
        counts = [1 + int(x) for x in exact]
        order = sorted(range(world_size), key=lambda r: (exact[r] - int(exact[r])), reverse=True)
        for r in order[: units - sum(counts)]:
            counts[r] += 1
        return counts


def make_partitioner(name: str) -> Partitioner:
    return partitioners.get(name)()
