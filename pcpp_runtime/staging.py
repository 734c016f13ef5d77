"""Coalescing a step's stale-context messages into a few transport messages.

At a displaced step every displaced layer posts its context for the next step: on the bench
model at 64x64 on 2 workers that is 96 messages per rank per step (46 group-norm statistics of
256 bytes, 39 halo blocks of 8-48 KiB, 11 key/value blocks of 64-160 KiB). Each transport
message costs a fixed amount of host work and thread wake-ups on both ranks, whatever its size;
on a CPU that also computes, that cost is taken from the compute (docs/BENCHMARKS.md).

:class:`StagedMessages` takes those messages instead of the transport. Messages to one peer are
kept in the order they are posted and sent as one ``uint8`` transport message (their bytes
concatenated) once they hold at least ``flush_bytes``, and whatever is left when the step ends
(:meth:`StagedMessages.flush`). A message of ``flush_bytes`` or more is not copied: the queue goes
first, then the message on its own from the layer's buffer (at 128x128 every key/value block is
1-2 MiB, and two more copies of 17 MB a step would cost more than batching saves). The
receiving rank posts its receives from that peer in the same order with the same sizes --
every rank runs the same layers in the same order and the policy is deterministic -- so it cuts
the same batches, receives each into one buffer, and scatters it into the layers' buffers when
the first of them is waited on. A batch never waits for more
than ``flush_bytes`` of later messages, so the context still travels while the step computes.

Which rank does what: every rank stages sends to the peers it has context for and receives from
the peers that have context for it; each pair (sender, receiver) has its own batches. Only the
next step's (stale) context goes through here; the fresh, blocking exchanges of synchronous
steps are sent as they are.

Shapes: any contiguous tensors; a batch is a flat ``uint8`` tensor on the first part's device.
"""

from __future__ import annotations

import torch

from .transports.base import Transport, Work

__all__ = ["StagedMessages"]


def _as_bytes(buf: torch.Tensor) -> torch.Tensor:
    """The bytes of the contiguous tensor ``buf``, as a flat ``uint8`` view (no copy)."""
    return buf.reshape(-1).view(torch.uint8)


class _InBatch:
    """One coalesced receive: its transport work, its buffer and the layers' buffers it fills."""

    def __init__(self, work: Work, staging: torch.Tensor, parts: list[torch.Tensor]) -> None:
        self.work = work
        self.staging = staging
        self.parts = parts
        self.scattered = False

    def wait(self, timeout: float | None) -> None:
        if self.scattered:
            return
        self.work.wait(timeout)
        offset = 0
        for part in self.parts:
            target = _as_bytes(part)
            target.copy_(self.staging[offset : offset + target.numel()])
            offset += target.numel()
        self.scattered = True
        self.parts = []


class _StagedRecv(Work):
    """A layer's receive inside a batch; complete once the batch has arrived and been scattered."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.batch: _InBatch | None = None

    def wait(self, timeout: float | None = None) -> None:
        if self.batch is None:
            raise RuntimeError(
                f"{self.where}: a staged receive was waited on before its batch was posted "
                "(the step that posted it has not ended)"
            )
        self.batch.wait(timeout)

    def is_completed(self) -> bool:
        if self.batch is None:
            return False
        if not self.batch.scattered and self.batch.work.is_completed():
            self.batch.wait(None)  # arrived: scatter now, so the buffer may be read as the contract says
        return self.batch.scattered


class _StagedSend(Work):
    """A layer's send inside a batch; its buffer is free once the batch was cut (copied)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.copied = False

    def wait(self, timeout: float | None = None) -> None:
        if not self.copied:
            raise RuntimeError(
                f"{self.where}: a staged send was waited on before the step that posted it ended "
                "(is a displaced layer called twice in one step?)"
            )

    def is_completed(self) -> bool:
        return self.copied


class _Queue:
    """Messages to or from one peer that are not yet in a batch."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.handles: list = []
        self.nbytes = 0


class StagedMessages:
    """One rank's staging of stale-context messages over ``transport``.

    Args:
        transport: the rank's transport (a group's, with CFG parallel).
        flush_bytes: a peer's queued messages go out as one batch once they reach this many
            bytes (> 0).
        tag: the transport tag of every batch (batches between one pair match in order).
    """

    def __init__(self, transport: Transport, flush_bytes: int, tag: int) -> None:
        if flush_bytes <= 0:
            raise ValueError(f"flush_bytes must be > 0, got {flush_bytes}")
        self.transport = transport
        self.flush_bytes = int(flush_bytes)
        self.tag = tag
        self._out: dict[int, _Queue] = {}
        self._in: dict[int, _Queue] = {}
        self._in_flight: list[tuple[Work, torch.Tensor]] = []  # batch sends and their buffers
        #: bytes this rank copied into batches it sent (messages under ``flush_bytes``)
        self.copied_bytes = 0

    def send(self, buf: torch.Tensor, dst: int, where: str) -> Work:
        """Queue ``buf`` (contiguous; unchanged until the step ends, or until the returned
        handle completes for a message of ``flush_bytes`` or more) for ``dst``."""
        if buf.numel() * buf.element_size() >= self.flush_bytes:
            self._send_batch(dst)
            return self.transport.isend(buf, dst, self.tag)
        return self._enqueue(self._out, dst, buf, _StagedSend(where), self._send_batch)

    def recv(self, buf: torch.Tensor, src: int, where: str) -> Work:
        """Queue a receive into ``buf`` (contiguous) from ``src`` (the same rule as :meth:`send`)."""
        if buf.numel() * buf.element_size() >= self.flush_bytes:
            self._recv_batch(src)
            return self.transport.irecv(buf, src, self.tag)
        return self._enqueue(self._in, src, buf, _StagedRecv(where), self._recv_batch)

    def _enqueue(self, queues: dict[int, _Queue], peer: int, buf: torch.Tensor, handle, cut) -> Work:
        """Add ``buf`` to ``peer``'s queue; ``cut(peer)`` makes the batch once it is full."""
        queue = queues.setdefault(peer, _Queue())
        queue.parts.append(buf)
        queue.handles.append(handle)
        queue.nbytes += buf.numel() * buf.element_size()
        if queue.nbytes >= self.flush_bytes:
            cut(peer)
        return handle

    def flush(self) -> None:
        """End of a step: send and post whatever is queued, sends first, peers in rank order
        (the same order on every rank)."""
        for dst in sorted(self._out):
            self._send_batch(dst)
        for src in sorted(self._in):
            self._recv_batch(src)

    def drain(self) -> None:
        """Wait until every batch sent has left (end of a generation)."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight.clear()

    def abandon(self) -> None:
        """Drop everything queued or in flight without waiting (after an error)."""
        self._out.clear()
        self._in.clear()
        self._in_flight.clear()

    def _send_batch(self, dst: int) -> None:
        queue = self._out.pop(dst, None)
        if queue is None or not queue.parts:
            return
        staging = torch.cat([_as_bytes(p) for p in queue.parts])  # a copy, also of a single part
        self.copied_bytes += queue.nbytes
        for handle in queue.handles:
            handle.copied = True
        self._in_flight = [(w, b) for w, b in self._in_flight if not w.is_completed()]
        self._in_flight.append((self.transport.isend(staging, dst, self.tag), staging))

    def _recv_batch(self, src: int) -> None:
        queue = self._in.pop(src, None)
        if queue is None or not queue.parts:
            return
        staging = torch.empty(queue.nbytes, dtype=torch.uint8, device=queue.parts[0].device)
        batch = _InBatch(self.transport.irecv(staging, src, self.tag), staging, queue.parts)
        for handle in queue.handles:
            handle.batch = batch
