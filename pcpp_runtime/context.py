"""The stale context one rank exchanges between steps, in buffers whose addresses do not change.

At a displaced step every displaced layer reads other ranks' context from the previous step and
writes its own for the next one. Those reads and writes go to buffers registered once per
generation shape:

* one flat **send** and one flat **receive** buffer per peer, in the activations' dtype: each
  layer's halo rows and keys/values for (from) that peer sit at a fixed offset, in layer order;
* one **table of group-norm statistics** per layer, float32, ``(N, width)`` with
  ``width = 2 * B * G``: row ``r`` holds rank ``r``'s. This rank writes its own row, that same
  memory goes to every peer, and the other rows are received in place, so a layer combines every
  rank's statistics with one matrix product. The tables of all layers are columns of one
  allocation ``(N, sum of widths)``.

A layer *declares* its slices on its first call of a generation -- their shapes at each
displaced step they serve, from the policy -- and reads and writes them through
:meth:`StaleContext.stale`, :meth:`outgoing` and :meth:`norm_table`, which answer for the current
step (set by :meth:`before_step`; a layer never passes the step, so a compiled forward sees the
same objects at every steady displaced step). On that first call the buffers do not exist yet:
``outgoing`` gives temporaries, copied into place when the buffers are allocated at the end of
the call (:meth:`after_step`).

Which rank does what, for a step ``t`` whose next step is displaced:

* during step ``t``'s forward each layer writes its context for ``t + 1`` -- no transport call,
  no wait;
* after each layer (:meth:`after_layer`, a hook between layers in eager mode) and after the
  forward (:meth:`after_step`), every message whose slices are all written is sent -- consecutive
  slices to one peer travel as one message once they hold ``coalesce_bytes`` (0: one message per
  slice) -- and the receives for ``t + 1`` are posted into slices this rank has finished reading;
* before step ``t + 1``'s forward (:meth:`before_step`) it waits for every receive of ``t + 1``
  and for step ``t``'s sends, whose memory step ``t + 1`` writes again.

Both ranks of a pair cut the same messages: they declare the same slices (the same layers in the
same order, shapes from the same deterministic policy) and cut them by the same rule.

Shapes: views have the shapes the layers declare; buffers are 1-D.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from .transports.base import Transport, TransportError, Work

if TYPE_CHECKING:
    from .accounting import ByteLedger

__all__ = ["StaleContext"]

Key = tuple[int, int]  # (layer's position in forward order, channel)


@dataclasses.dataclass
class _Slice:
    """One layer's message to (or from) one peer: its shape at each displaced step it serves and
    what the layer wants to know with it (``meta``, e.g. which rows)."""

    shapes: dict[int, tuple[int, ...]]
    kind: str  # ledger kind: halo, attention_kv, norm
    meta: dict[int, Hashable]


@dataclasses.dataclass
class _Message:
    """Consecutive slices sent as one transport message."""

    start: int  # element offsets in the stream's buffer
    end: int
    last_position: int  # sent (received into) once the layer at this position in the forward is done
    kinds: dict[str, int]  # bytes by ledger kind


class _Layout:
    """Where each slice of one stream sits at one step, and the messages cut from them. Steps with
    the same slices share one layout (and so one set of view objects)."""

    def __init__(self, entries: tuple, buffer: torch.Tensor, flush_elements: int, element_size: int) -> None:
        self.entries = entries  # ((key, shape, meta, kind), ...) in forward order
        self.offsets: dict[Key, int] = {}
        self.shapes: dict[Key, tuple[int, ...]] = {}
        self.meta: dict[Key, Hashable] = {}
        self.views: dict[Key, torch.Tensor] = {}
        self.messages: list[_Message] = []
        offset = start = 0
        kinds: dict[str, int] = {}
        for key, shape, meta, kind in entries:
            numel = math.prod(shape)
            self.offsets[key], self.shapes[key], self.meta[key] = offset, shape, meta
            self.views[key] = buffer[offset : offset + numel].view(shape)
            offset += numel
            kinds[kind] = kinds.get(kind, 0) + numel * element_size
            if offset - start >= flush_elements:
                self.messages.append(_Message(start, offset, key[0], kinds))  # key[0]: the slice's position
                start, kinds = offset, {}
        if offset > start:
            self.messages.append(_Message(start, offset, entries[-1][0][0], kinds))


class _Stream:
    """One direction of messages between this rank and one peer."""

    def __init__(self) -> None:
        self.slices: dict[Key, _Slice] = {}
        self.buffer: torch.Tensor | None = None
        self.layouts: dict[int, _Layout] = {}  # step served -> layout

    def entries(self, step: int) -> tuple:
        return tuple(
            (key, item.shapes[step], item.meta.get(step), item.kind)
            for key, item in sorted(self.slices.items())
            if math.prod(item.shapes.get(step, (0,))) > 0
        )

    def allocate(self, steps: list[int], dtype: torch.dtype, device: torch.device, flush_elements: int,
                 buffer: torch.Tensor | None = None) -> None:
        """The buffer (``buffer`` if given) and one layout per step (shared between equal steps)."""
        per_step = {step: self.entries(step) for step in steps}
        capacity = max((sum(math.prod(e[1]) for e in entries) for entries in per_step.values()), default=0)
        self.buffer = torch.empty(capacity, dtype=dtype, device=device) if buffer is None else buffer
        element = self.buffer.element_size()
        shared: dict[tuple, _Layout] = {}
        for step, entries in per_step.items():
            if entries:
                if entries not in shared:
                    shared[entries] = _Layout(entries, self.buffer, flush_elements, element)
                self.layouts[step] = shared[entries]


class StaleContext:
    """One rank's stale-context buffers and messages (see the module docstring).

    Args:
        transport: the rank's transport (its group's, with CFG parallel).
        ledger: where the bytes of every message are recorded, by kind and step served.
        coalesce_bytes: consecutive slices to one peer go as one message once they hold this
            many bytes (0: one message per slice).
        tags: the transport tags of the two message streams between a pair (activations, norm).
        eager_posting: post messages from :meth:`after_layer` as layers finish (eager mode);
            ``False`` posts them all in :meth:`after_step` (a compiled forward runs no hooks).
    """

    def __init__(self, transport: Transport, ledger: ByteLedger, coalesce_bytes: int, tags: tuple[int, int],
                 eager_posting: bool = True) -> None:
        self.transport = transport
        self.ledger = ledger
        self.coalesce_bytes = coalesce_bytes
        self.tags = tags
        self.eager_posting = eager_posting
        self.rank = transport.rank
        self.world_size = transport.world_size
        self._reset()

    def _reset(self) -> None:
        self._send: dict[int, _Stream] = {}  # peer -> stream
        self._recv: dict[int, _Stream] = {}
        self._norm = _Stream()  # this rank's row of the statistics tables
        self._norm_tables: dict[int, torch.Tensor] = {}  # layer id -> (N, width) view (or temporary)
        self._norm_columns: dict[int, tuple[int, int]] = {}  # layer id -> (first column, width)
        #: layer id -> position in forward order (the order of the first call's declarations): a
        #: message goes once the layer at its last position is done, so positions must follow the
        #: forward, which the order of a model's modules need not (a mid block lists its attentions
        #: before its resnets but runs a resnet first)
        self._position: dict[int, int] = {}
        self._norm_all: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None
        self._device = torch.device("cpu")
        self._registered = False
        self._step = 0
        self._temporaries: list[tuple[int, Key, torch.Tensor]] = []  # (peer, key, tensor) written before allocation
        #: the layouts of the current step: what this rank reads, and where it writes for the next step
        self._reading: dict[int, _Layout | None] = {}
        self._writing: dict[int, _Layout | None] = {}
        self._sent: list[Work] = []
        self._received: list[Work] = []
        self._posted: set[tuple[str, int, int]] = set()  # (direction, peer, message index) of the step being posted
        self._posted_step = -1

    # ------------------------------------------------------------------ declaring
    def begin_generation(self) -> None:
        """New shapes: forget the buffers; the layers declare their slices again on their next call."""
        self.drain()
        self._reset()

    def declare(self, layer: int, channel: int, peer: int, *, send: bool, shapes: dict[int, tuple[int, ...]], kind: str,
                dtype: torch.dtype, device: torch.device, meta: dict[int, Hashable] | None = None) -> None:
        """A layer's message to (``send``) or from ``peer``: its shape at each displaced step it
        serves (a step it is missing from, or of zero elements, sends nothing)."""
        self._check_declaring()
        if self._dtype is None:
            self._dtype, self._device = dtype, device
        elif dtype != self._dtype:
            raise TypeError(f"the stale context of one generation is of one dtype: {self._dtype} and {dtype}")
        stream = (self._send if send else self._recv).setdefault(peer, _Stream())
        key = (self._position.setdefault(layer, len(self._position)), channel)
        if key in stream.slices:
            raise RuntimeError(f"layer {layer} declared channel {channel} with peer {peer} twice")
        stream.slices[key] = _Slice(dict(shapes), kind, dict(meta or {}))

    def declare_norm(self, layer: int, width: int, steps: list[int], device: torch.device) -> None:
        """A group-norm layer's statistics table, ``width`` float32 values per rank; its row goes
        to (comes from) every peer for each of ``steps``."""
        self._check_declaring()
        self._device = device
        self._norm_columns[layer] = (sum(w for _, w in self._norm_columns.values()), width)
        position = self._position.setdefault(layer, len(self._position))
        self._norm.slices[(position, 0)] = _Slice({step: (width,) for step in steps}, "norm", {})

    def _check_declaring(self) -> None:
        if self._registered:
            raise RuntimeError("stale-context slices are declared on a generation's first call only")

    # ------------------------------------------------------------------ views
    def stale(self, layer: int, channel: int, peer: int) -> torch.Tensor | None:
        """``peer``'s message of the previous step for this step (``None``: none at this step)."""
        if not self._registered:
            raise RuntimeError("stale context was read before the first call of the generation ended")
        layout = self._reading.get(peer)
        return None if layout is None else layout.views.get((self._position.get(layer), channel))

    def stale_meta(self, layer: int, channel: int, peer: int) -> Hashable:
        layout = self._reading.get(peer)
        return None if layout is None else layout.meta.get((self._position.get(layer), channel))

    def outgoing(self, layer: int, channel: int, peer: int) -> torch.Tensor | None:
        """Where this step's message to ``peer`` for the next step is written (``None``: nothing
        to send); a temporary on the generation's first call."""
        key = (self._position.get(layer), channel)
        if self._registered:
            layout = self._writing.get(peer)
            return None if layout is None else layout.views.get(key)
        stream = self._send.get(peer)
        item = stream.slices.get(key) if stream is not None else None
        shape = item.shapes.get(self._step + 1) if item is not None else None
        if shape is None or math.prod(shape) == 0:
            return None
        temporary = torch.empty(shape, dtype=self._dtype, device=self._device)
        self._temporaries.append((peer, key, temporary))
        return temporary

    def outgoing_meta(self, layer: int, channel: int, peer: int) -> Hashable:
        key = (self._position.get(layer), channel)
        if self._registered:
            layout = self._writing.get(peer)
            return None if layout is None else layout.meta.get(key)
        item = self._send[peer].slices.get(key) if peer in self._send else None
        return None if item is None else item.meta.get(self._step + 1)

    def norm_table(self, layer: int) -> torch.Tensor:
        """Every rank's group-norm statistics of ``layer``, ``(N, width)`` float32, row ``r``
        rank ``r``'s (a temporary on the generation's first call)."""
        table = self._norm_tables.get(layer)
        if table is None:
            table = torch.empty(self.world_size, self._norm_columns[layer][1], dtype=torch.float32, device=self._device)
            self._norm_tables[layer] = table
        return table

    # ------------------------------------------------------------------ allocation
    def _allocate(self, steps: list[int]) -> None:
        """Buffers and layouts for every declared slice; what this first call wrote into
        temporaries is copied into place."""
        element = torch.empty((), dtype=self._dtype or torch.float32).element_size()
        flush = -(-self.coalesce_bytes // element)
        for stream in [*self._send.values(), *self._recv.values()]:
            stream.allocate(steps, self._dtype, self._device, flush)
        width = sum(w for _, w in self._norm_columns.values())
        self._norm_all = torch.empty(self.world_size, width, dtype=torch.float32, device=self._device)
        self._norm.allocate(steps, torch.float32, self._device, -(-self.coalesce_bytes // 4), self._norm_all[self.rank])
        for layout in self._norm.layouts.values():  # every rank's tables share one column layout
            assert all(layout.offsets[(self._position[layer], 0)] == first for layer, (first, _) in self._norm_columns.items()
                       if (self._position[layer], 0) in layout.offsets)
        for layer, (first, columns) in self._norm_columns.items():
            table = self._norm_all[:, first : first + columns]
            temporary = self._norm_tables.get(layer)
            if temporary is not None:
                table.copy_(temporary)
            self._norm_tables[layer] = table
        self._registered = True
        self._bind(self._step)
        for peer, key, temporary in self._temporaries:
            self._writing[peer].views[key].copy_(temporary)
        self._temporaries = []

    def _bind(self, step: int) -> None:
        """Point :meth:`stale` and :meth:`outgoing` at ``step``'s layouts (the last layout for a
        next step that reads nothing, so the last step writes where no message goes)."""
        self._step = step
        if not self._registered:
            return
        for peer, stream in self._recv.items():
            self._reading[peer] = stream.layouts.get(step)
        for peer, stream in self._send.items():
            nxt = stream.layouts.get(step + 1)
            if nxt is None and stream.layouts:
                nxt = stream.layouts[max(stream.layouts)]
            self._writing[peer] = nxt

    # ------------------------------------------------------------------ messages
    def before_step(self, step: int, displaced: bool) -> None:
        """Before a forward: the previous step's sends have left (their memory is written again)
        and, at a displaced step, every receive of this step has arrived."""
        self._wait(self._sent, "sending stale context", step)
        if displaced:
            self._wait(self._received, "receiving stale context", step)
        self._bind(step)

    def after_layer(self, layer: int) -> None:
        """``layer`` finished the current step (eager mode): send the messages for the next step
        whose slices are all written, and post receives into slices this rank has read."""
        if self.eager_posting and self._registered and layer in self._position:
            self._post(self._step + 1, upto=self._position[layer])

    def after_step(self, next_displaced: bool, displaced_steps: list[int]) -> None:
        """The forward ended: on a generation's first call allocate the buffers; then post
        everything left for the next step when it is displaced."""
        if not self._registered and displaced_steps:
            self._allocate(displaced_steps)
        if next_displaced:
            self._post(self._step + 1, upto=None)

    def _post(self, step: int, upto: int | None) -> None:
        """Post the messages of ``step`` whose last slice's layer is at position ``upto`` or
        earlier in the forward (all for ``None``)."""
        if step != self._posted_step:
            self._posted, self._posted_step = set(), step
        for peer in sorted(self._send):
            self._post_stream("send", peer, self._send[peer].layouts.get(step), self._send[peer].buffer, upto)
        for peer in sorted(self._recv):
            self._post_stream("recv", peer, self._recv[peer].layouts.get(step), self._recv[peer].buffer, upto)
        layout = self._norm.layouts.get(step)
        for peer in range(self.world_size):
            if peer != self.rank and self._norm_all is not None:
                self._post_stream("norm-send", peer, layout, self._norm_all[self.rank], upto)
                self._post_stream("norm-recv", peer, layout, self._norm_all[peer], upto)

    def _post_stream(self, direction: str, peer: int, layout: _Layout | None, buffer, upto: int | None) -> None:
        if layout is None:
            return
        sending = direction.endswith("send")
        tag = self.tags[1] if direction.startswith("norm") else self.tags[0]
        record = self.ledger.add_sent if sending else self.ledger.add_received
        for index, message in enumerate(layout.messages):
            if upto is not None and message.last_position > upto:
                break
            if (direction, peer, index) in self._posted:
                continue
            self._posted.add((direction, peer, index))
            for kind, nbytes in message.kinds.items():
                record(self._posted_step, kind, nbytes)
            part = buffer[message.start : message.end]
            if sending:
                self._sent.append(self.transport.isend(part, peer, tag))
            else:
                self._received.append(self.transport.irecv(part, peer, tag))

    def _wait(self, works: list[Work], what: str, step: int) -> None:
        try:
            for work in works:
                work.wait()
        except TransportError as exc:
            raise type(exc)(f"{what} for step {step}: {exc}") from exc
        finally:
            works.clear()

    def drain(self) -> None:
        """Complete every posted message (end of a generation)."""
        for works in (self._sent, self._received):
            for work in works:
                work.wait()
            works.clear()

    def abandon(self) -> None:
        """Drop posted messages without waiting (after an error; peers may be gone)."""
        self._sent.clear()
        self._received.clear()

    # ------------------------------------------------------------------ accounting
    def stale_buffer_bytes(self) -> dict[str, int]:
        """Bytes of this rank's receive buffers, by kind (each slice at its largest)."""
        out: dict[str, int] = {}
        element = torch.empty((), dtype=self._dtype or torch.float32).element_size()
        for stream in self._recv.values():
            for item in stream.slices.values():
                largest = max((math.prod(shape) for shape in item.shapes.values()), default=0)
                out[item.kind] = out.get(item.kind, 0) + largest * element
        if self._norm.slices and self.world_size > 1 and any(item.shapes for item in self._norm.slices.values()):
            out["norm"] = (self.world_size - 1) * sum(w for _, w in self._norm_columns.values()) * 4
        return out
