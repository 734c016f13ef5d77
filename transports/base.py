"""The transport contract every implementation follows.

A transport moves tensors between the ranks of one job. The engine talks to other workers only
through this interface, so the same numerics run over threads in one process (``local``),
torch.distributed (``torch``), MPI (``mpi``) or ZeroMQ (``zmq``).

Rules every implementation keeps:

* **The caller owns the buffers.** ``irecv`` fills a tensor it is given; nothing returns a fresh
  tensor. Buffers must be contiguous.
* **Every asynchronous call returns a** :class:`Work` with ``wait(timeout)`` and
  ``is_completed()``. ``wait`` means "the buffer may be read (recv) or reused (send)" on the
  host; transports that run on CUDA streams say in their own docstring what it means there.
* **Every wait has a timeout** (the transport's ``timeout_s`` unless a call gives one) and raises
  :class:`TransportTimeout` naming the transport, this rank, the peer and the operation.
* **Tensors and objects travel differently.** Objects (handshakes, small control messages) go on
  the control path and are encoded with msgpack; nothing received is ever unpickled.
* **Bytes are counted** in :attr:`Transport.counters`: payload bytes sent and received, plus
  framing where the transport knows it.

Point-to-point messages between one (src, dst) pair with the same tag are matched in the order
they were posted. Collectives (``all_gather``, ``all_reduce``) must be called by every rank in
the same order. The default collectives here are built on point-to-point messages with tags in
a reserved range (``tag >= COLLECTIVE_TAG_BASE``); implementations may override them with native
ones as long as the results are bit-identical on every rank.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "COLLECTIVE_TAG_BASE",
    "ByteCounters",
    "CompletedWork",
    "MultiWork",
    "PeerFailed",
    "Transport",
    "TransportError",
    "TransportTimeout",
    "Work",
]

#: Tags at or above this value are reserved for the default collectives.
COLLECTIVE_TAG_BASE = 1 << 30


class TransportError(RuntimeError):
    """A transport operation failed; the message names transport, ranks and operation."""


class TransportTimeout(TransportError):
    """A wait ran past its timeout."""


class PeerFailed(TransportError):
    """A peer rank died or reported an error, so this operation can never complete."""


@dataclasses.dataclass
class ByteCounters:
    """Bytes moved by one rank, as counted by its transport.

    ``payload_*`` counts tensor bytes only (what the engine's own accounting predicts);
    ``framing_*`` counts headers and other overhead where the transport knows it.
    """

    payload_sent: int = 0
    payload_received: int = 0
    framing_sent: int = 0
    framing_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add_sent(self, payload: int, framing: int = 0) -> None:
        with self._lock:
            self.payload_sent += payload
            self.framing_sent += framing
            self.messages_sent += 1

    def add_received(self, payload: int, framing: int = 0) -> None:
        with self._lock:
            self.payload_received += payload
            self.framing_received += framing
            self.messages_received += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


class Work(abc.ABC):
    """Handle of one asynchronous operation."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> None:
        """Block until the operation completes; raise :class:`TransportTimeout` after ``timeout``
        seconds (``None``: the transport's default) or :class:`PeerFailed` if it never can."""

    @abc.abstractmethod
    def is_completed(self) -> bool:
        """True once ``wait`` would return at once."""


class CompletedWork(Work):
    """A handle for an operation that finished when it was posted."""

    def wait(self, timeout: float | None = None) -> None:
        return None

    def is_completed(self) -> bool:
        return True


class MultiWork(Work):
    """Several handles waited on as one (in order, sharing one deadline)."""

    def __init__(self, works: Sequence[Work], on_complete: Any = None) -> None:
        self._works = list(works)
        self._on_complete = on_complete
        self._done = False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        for work in self._works:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            work.wait(remaining)
        if self._on_complete is not None:
            self._on_complete()
        self._done = True

    def is_completed(self) -> bool:
        return self._done or all(w.is_completed() for w in self._works)


def _check_buffer(buf: torch.Tensor, op: str) -> None:
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor buffer, got {type(buf).__name__}")
    if not buf.is_contiguous():
        raise ValueError(f"{op}: buffer must be contiguous (got shape {tuple(buf.shape)}, strides {buf.stride()})")


def tensor_nbytes(buf: torch.Tensor) -> int:
    return buf.numel() * buf.element_size()


class Transport(abc.ABC):
    """One rank's endpoint of a job's communication.

    Subclasses implement :meth:`isend`, :meth:`irecv` and the object path, and release what
    they hold in :meth:`_close`; the collectives have default implementations on top of
    point-to-point messages.

    Lifecycle: a process transport's ``connect()`` joins the job and sets ``_connected``; every
    operation calls :meth:`_require` first, which refuses a transport that is not connected or
    already closed. :meth:`close` marks the transport closed and calls :meth:`_close` once.

    Attributes:
        name: the registered name (``"local"``, ``"torch"``, ``"mpi"``, ``"zmq"``, ...).
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks in the job.
        timeout_s: default timeout of every wait, in seconds.
        counters: bytes and messages this rank sent and received.
    """

    name: str = "transport"

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.counters = ByteCounters()
        self._collective_seq = 0
        self._connected = False  # set by the connect() of transports that have one
        self._closed = False

    # ----------------------------------------------------------------- point to point
    @abc.abstractmethod
    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        """Post a send of ``buf`` (contiguous) to rank ``dst``. The caller must not modify
        ``buf`` until the returned handle completes."""

    @abc.abstractmethod
    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        """Post a receive from rank ``src`` into ``buf`` (contiguous, exactly the sent size)."""

    # ----------------------------------------------------------------- objects
    @abc.abstractmethod
    def send_object(self, obj: Any, dst: int) -> None:
        """Send a small msgpack-encodable object (dicts, lists, str, numbers, bytes) to ``dst``."""

    @abc.abstractmethod
    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        """Receive the next object sent by ``src``."""

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release sockets, communicators and threads. Safe to call twice: the first call marks
        the transport closed (so every later operation is refused) and then, if the transport
        was connected, calls :meth:`_close`; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._connected:
            self._close()

    def _close(self) -> None:
        """Release this transport's own resources; called once, by the first :meth:`close` of a
        connected transport, after it is marked closed (so a thread inside an operation stops at
        its next check). Nothing to release by default."""

    def _require(self, op: str) -> None:
        """Refuse ``op`` unless the transport is connected and not closed."""
        if not self._connected or self._closed:
            state = "closed" if self._closed else "not connected (call connect() first)"
            raise TransportError(f"{self.describe(op=op)}: transport is {state}")

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self, peer: int | None = None, op: str = "") -> str:
        """Prefix for error messages: transport, this rank and the peer."""
        text = f"{self.name} transport, rank {self.rank}/{self.world_size}"
        if op:
            text += f", {op}"
        if peer is not None:
            text += f" with peer rank {peer}"
        return text

    def _check_peer(self, peer: int, op: str) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(
                f"{self.describe(op=op)}: peer must be another rank in [0, {self.world_size}), got {peer}"
            )

    def _check_message(self, buf: torch.Tensor, peer: int, op: str) -> None:
        """Refuse a point-to-point ``op`` whose buffer is not a contiguous tensor or whose peer
        is not another rank of the job."""
        _check_buffer(buf, op)
        self._check_peer(peer, op)

    # ----------------------------------------------------------------- collectives
    def _next_collective_tag(self) -> int:
        tag = COLLECTIVE_TAG_BASE + (self._collective_seq % (1 << 20))
        self._collective_seq += 1
        return tag

    def iall_gather(self, outputs: Sequence[torch.Tensor], input: torch.Tensor) -> Work:
        """Post an all-gather: ``outputs[r]`` receives rank r's ``input``; shards may differ in
        size. ``outputs[self.rank]`` is filled by a local copy (not counted as received)."""
        if len(outputs) != self.world_size:
            raise ValueError(f"{self.describe(op='all_gather')}: need {self.world_size} outputs, got {len(outputs)}")
        _check_buffer(input, "all_gather")
        tag = self._next_collective_tag()
        outputs[self.rank].copy_(input.view_as(outputs[self.rank]))
        works: list[Work] = []
        for peer in range(self.world_size):
            if peer != self.rank:
                works.append(self.irecv(outputs[peer], peer, tag))
        for peer in range(self.world_size):
            if peer != self.rank:
                works.append(self.isend(input, peer, tag))
        return MultiWork(works)

    def all_gather(self, outputs: Sequence[torch.Tensor], input: torch.Tensor, timeout: float | None = None) -> None:
        """Blocking :meth:`iall_gather`."""
        self.iall_gather(outputs, input).wait(timeout)

    def all_reduce(self, buf: torch.Tensor, op: str = "sum", timeout: float | None = None) -> None:
        """Reduce ``buf`` over all ranks in place. The sum is taken in rank order on every rank,
        so every rank gets bit-identical results."""
        if op not in ("sum", "max", "min"):
            raise ValueError(f"{self.describe(op='all_reduce')}: op must be sum, max or min, got {op!r}")
        if self.world_size == 1:
            return
        gathered = [torch.empty_like(buf) for _ in range(self.world_size)]
        self.all_gather(gathered, buf.contiguous(), timeout)
        result = gathered[0].clone()
        for part in gathered[1:]:
            if op == "sum":
                result.add_(part)
            elif op == "max":
                torch.maximum(result, part, out=result)
            else:
                torch.minimum(result, part, out=result)
        buf.copy_(result)

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier."""
        token = torch.zeros(1, dtype=torch.uint8)
        self.all_reduce(token, "sum", timeout)

    def broadcast_object(self, obj: Any, root: int = 0, timeout: float | None = None) -> Any:
        """Rank ``root``'s ``obj`` on every rank (msgpack on the control path)."""
        if self.rank == root:
            for peer in range(self.world_size):
                if peer != root:
                    self.send_object(obj, peer)
            return obj
        return self.recv_object(root, timeout)
