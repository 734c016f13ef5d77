"""What every displaced layer shares: its id, its path, the runtime, and buffer registration."""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import RankRuntime, make_tag
from ..transports.base import Work

__all__ = ["DisplacedLayer", "DisplacedModule", "FlatBuffer"]


class FlatBuffer:
    """One flat allocation handing out contiguous views of any shape that fits.

    Registered once per layer and generation; views for a message of ``shape`` are the first
    ``prod(shape)`` elements, so a smaller message (a policy asking for fewer rows at some step)
    reuses the same memory.
    """

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.empty(numel, dtype=dtype, device=device)

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for dim in shape:
            numel *= dim
        if numel > self.data.numel():
            raise RuntimeError(f"message of shape {shape} exceeds its registered buffer of {self.data.numel()} elements")
        return self.data[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class DisplacedLayer:
    """Mixin state of one displaced layer on one rank.

    Attributes:
        layer_id: index shared by all ranks (assigned in module order when the plan is applied).
        path: module path, for error messages.
        runtime: the rank's engine state.
    """

    kind = "layer"

    def __init__(self, layer_id: int, path: str, runtime: RankRuntime) -> None:
        self.layer_id = layer_id
        self.path = path
        self.runtime = runtime
        self._generation = -1
        self._pending_recv: list[Work] = []
        self._pending_send: list[Work] = []
        self.stale_buffer_bytes = 0

    def tag(self, channel: int) -> int:
        return make_tag(self.layer_id, channel)

    def where(self, what: str) -> str:
        return f"{what} in {self.kind} layer {self.path!r}"

    def needs_registration(self) -> bool:
        """True on the first call of a generation whose shapes differ from the last one."""
        return self._generation != self.runtime.generation

    def mark_registered(self) -> None:
        self._generation = self.runtime.generation

    def wait_received(self) -> None:
        """Wait for the stale context posted during the previous step."""
        for work in self._pending_recv:
            self.runtime.wait(work, self.where("receiving stale context"))
        self._pending_recv.clear()

    def wait_sent(self) -> None:
        """Wait until the previous step's sends have left the send buffers."""
        for work in self._pending_send:
            self.runtime.wait(work, self.where("sending context"))
        self._pending_send.clear()

    def drain(self) -> None:
        """Complete whatever is still posted (end of a generation or after an error)."""
        self.wait_sent()
        self.wait_received()

    def abandon(self) -> None:
        """Drop posted messages without waiting (after an error; peers may be gone)."""
        self._pending_send.clear()
        self._pending_recv.clear()
        self._generation = -1


class DisplacedModule(nn.Module, DisplacedLayer):
    """A displaced layer that replaces a module of the model (every kind but self-attention,
    which is an attention processor): an ``nn.Module`` with :class:`DisplacedLayer`'s state.
    Subclasses keep the module they replace as an attribute and implement ``forward``."""

    def __init__(self, layer_id: int, path: str, runtime: RankRuntime) -> None:
        nn.Module.__init__(self)  # first: nn.Module refuses attributes before its own __init__
        DisplacedLayer.__init__(self, layer_id, path, runtime)
