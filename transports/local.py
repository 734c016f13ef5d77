"""In-process transport: N ranks as threads of one process.

It implements the same contract as the process transports and makes the numerics testable in
seconds. A :class:`LocalFabric` is the shared "wire": one per job, handed to every rank's
:class:`LocalTransport`. Sends are buffered (the payload is copied when posted, so a send
completes at once); a receive completes when a matching message has been copied into its buffer.
Messages between one (src, dst, tag) are matched first posted, first matched.

If one rank fails, :meth:`LocalFabric.abort` wakes every waiting rank with :class:`PeerFailed`.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import msgpack
import torch

from .base import CompletedWork, PeerFailed, Transport, TransportTimeout, Work, tensor_nbytes

__all__ = ["LocalFabric", "LocalTransport"]


class _RecvWork(Work):
    def __init__(self, transport: "LocalTransport", buf: torch.Tensor, src: int, tag: int) -> None:
        self._transport = transport
        self.buf = buf
        self.src = src
        self.tag = tag
        self._event = threading.Event()

    def complete(self) -> None:
        self._event.set()

    def is_completed(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        fabric = self._transport.fabric
        limit = self._transport.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not self._event.is_set():
            failed = fabric.failure
            if failed is not None:
                raise PeerFailed(f"{self._transport.describe(self.src, f'recv tag {self.tag}')}: {failed}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(
                    f"{self._transport.describe(self.src, f'recv tag {self.tag}')}: "
                    f"no message after {limit:.1f} s"
                )
            self._event.wait(min(remaining, 0.05))


class LocalFabric:
    """The shared state of one in-process job: mailboxes between every pair of ranks."""

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._lock = threading.Lock()
        # (src, dst, tag) -> queued payloads (sent before the matching recv was posted)
        self._queued: dict[tuple[int, int, int], collections.deque[torch.Tensor]] = collections.defaultdict(
            collections.deque
        )
        # (src, dst, tag) -> receives posted before the matching send
        self._waiting: dict[tuple[int, int, int], collections.deque[_RecvWork]] = collections.defaultdict(
            collections.deque
        )
        self._objects: dict[tuple[int, int], collections.deque[bytes]] = collections.defaultdict(collections.deque)
        self._object_cv = threading.Condition(self._lock)
        self.failure: str | None = None

    def transport(self, rank: int, timeout_s: float = 60.0) -> "LocalTransport":
        """The endpoint of ``rank``."""
        return LocalTransport(self, rank, timeout_s)

    def abort(self, reason: str) -> None:
        """Mark the job failed; every current and future wait raises :class:`PeerFailed`."""
        with self._lock:
            if self.failure is None:
                self.failure = reason
            self._object_cv.notify_all()


class LocalTransport(Transport):
    """One rank of a :class:`LocalFabric`. ``wait`` means host completion (copies are done).

    It is connected from the start and holds nothing to release (the fabric belongs to the
    caller): ``close`` only marks this endpoint closed.
    """

    name = "local"

    def __init__(self, fabric: LocalFabric, rank: int, timeout_s: float = 60.0) -> None:
        super().__init__(rank, fabric.world_size, timeout_s)
        self.fabric = fabric
        self._connected = True  # the fabric is the connection: usable from the start

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        self._check_message(buf, dst, "isend")
        fabric = self.fabric
        key = (self.rank, dst, tag)
        nbytes = tensor_nbytes(buf)
        with fabric._lock:
            if fabric.failure is not None:
                raise PeerFailed(f"{self.describe(dst, f'send tag {tag}')}: {fabric.failure}")
            waiting = fabric._waiting.get(key)
            if waiting:
                recv = waiting.popleft()
                _copy_into(recv, buf, self, dst)
                recv._transport.counters.add_received(nbytes)
                recv.complete()
            else:
                fabric._queued[key].append(buf.detach().clone())
        self.counters.add_sent(nbytes)
        return CompletedWork()

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        self._check_message(buf, src, "irecv")
        fabric = self.fabric
        key = (src, self.rank, tag)
        work = _RecvWork(self, buf, src, tag)
        with fabric._lock:
            queued = fabric._queued.get(key)
            if queued:
                payload = queued.popleft()
                _copy_into(work, payload, self, src)
                self.counters.add_received(tensor_nbytes(payload))
                work.complete()
            else:
                fabric._waiting[key].append(work)
        return work

    def send_object(self, obj: Any, dst: int) -> None:
        self._check_peer(dst, "send_object")
        data = msgpack.packb(obj, use_bin_type=True)
        with self.fabric._object_cv:
            self.fabric._objects[(self.rank, dst)].append(data)
            self.fabric._object_cv.notify_all()
        self.counters.add_sent(0, len(data))

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        self._check_peer(src, "recv_object")
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        fabric = self.fabric
        with fabric._object_cv:
            box = fabric._objects[(src, self.rank)]
            while not box:
                if fabric.failure is not None:
                    raise PeerFailed(f"{self.describe(src, 'recv_object')}: {fabric.failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportTimeout(f"{self.describe(src, 'recv_object')}: no object after {limit:.1f} s")
                fabric._object_cv.wait(min(remaining, 0.05))
            data = box.popleft()
        self.counters.add_received(0, len(data))
        return msgpack.unpackb(data, raw=False)


def _copy_into(recv: _RecvWork, payload: torch.Tensor, transport: Transport, peer: int) -> None:
    if recv.buf.numel() * recv.buf.element_size() != tensor_nbytes(payload) or recv.buf.dtype != payload.dtype:
        raise ValueError(
            f"{transport.describe(peer, f'tag {recv.tag}')}: message of {tuple(payload.shape)} {payload.dtype} "
            f"does not fit receive buffer {tuple(recv.buf.shape)} {recv.buf.dtype}"
        )
    recv.buf.copy_(payload.view_as(recv.buf))
