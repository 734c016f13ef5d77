"""What every displaced layer shares: its id, its path, the runtime, and buffer registration."""

from __future__ import annotations

from torch import nn

from ..runtime import RankRuntime, make_tag

__all__ = ["DisplacedLayer", "DisplacedModule"]


class DisplacedLayer:
    """Mixin state of one displaced layer on one rank.

    Attributes:
        layer_id: index shared by all ranks (assigned in module order when the plan is applied).
        path: module path, for error messages.
        runtime: the rank's engine state; its :attr:`~pcpp_runtime.runtime.RankRuntime.context`
            holds this layer's stale context between steps.
    """

    kind = "layer"

    def __init__(self, layer_id: int, path: str, runtime: RankRuntime) -> None:
        self.layer_id = layer_id
        self.path = path
        self.runtime = runtime
        self._generation = -1

    def tag(self, channel: int) -> int:
        return make_tag(self.layer_id, channel)

    def where(self, what: str) -> str:
        return f"{what} in {self.kind} layer {self.path!r}"

    def needs_registration(self) -> bool:
        """True on the first call of a generation whose shapes differ from the last one."""
        return self._generation != self.runtime.generation

    def mark_registered(self) -> None:
        self._generation = self.runtime.generation


class DisplacedModule(nn.Module, DisplacedLayer):
    """A displaced layer that replaces a module of the model (every kind but self-attention,
    which is an attention processor): an ``nn.Module`` with :class:`DisplacedLayer`'s state.
    Subclasses keep the module they replace as an attribute and implement ``forward``."""

    def __init__(self, layer_id: int, path: str, runtime: RankRuntime) -> None:
        nn.Module.__init__(self)  # first: nn.Module refuses attributes before its own __init__
        DisplacedLayer.__init__(self, layer_id, path, runtime)
