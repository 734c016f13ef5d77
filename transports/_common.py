"""Helpers shared by the process transports (not part of the public interface).

* :func:`host_bytes` views a CPU tensor's memory as a flat ``numpy.uint8`` array (no copy), so
  every dtype (bfloat16 included, which numpy lacks) travels as raw bytes.
* :func:`poll_until` waits for a non-blocking ``test()`` to turn true before a deadline, spinning
  briefly and then sleeping with a growing back-off of at most 0.2 ms (MPI moves large messages
  only inside ``Test`` calls, so longer sleeps slow them down), so a wait costs little latency
  and little CPU.
* :class:`PendingSends` keeps fire-and-forget sends (object messages) and their buffers alive until
  they complete.
* :func:`unpack_object` decodes a received object message (msgpack only, never a pickle).
* :class:`PeerWork` is the base of the handles for one operation with one peer: it keeps what their
  errors name and turns ``wait``'s ``timeout`` into a limit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch

from .base import COLLECTIVE_TAG_BASE, Transport, TransportError, TransportTimeout, Work

__all__ = [
    "COLLECTIVE_TAG_SPAN",
    "OBJECT_TAG",
    "PeerWork",
    "PendingSends",
    "check_tag",
    "host_bytes",
    "poll_until",
    "unpack_object",
]

#: The default collectives use tags in ``[COLLECTIVE_TAG_BASE, COLLECTIVE_TAG_BASE + span)``.
COLLECTIVE_TAG_SPAN = 1 << 20
#: A tag inside the reserved range (``>= COLLECTIVE_TAG_BASE``) that no default collective uses;
#: transports that send objects over their tensor path put them here.
OBJECT_TAG = COLLECTIVE_TAG_BASE + 2 * COLLECTIVE_TAG_SPAN


def host_bytes(buf: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a writable 1-D ``uint8`` numpy array (a view)."""
    if buf.device.type != "cpu":
        raise ValueError(f"host_bytes needs a CPU tensor, got one on {buf.device}")
    flat = buf.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy()


def check_tag(tag: int, op: str, describe: Callable[..., str], limit: int = 1 << 31) -> None:
    """Reject tags that are not ints in ``[0, limit)``."""
    if isinstance(tag, bool) or not isinstance(tag, int) or not 0 <= tag < limit:
        raise ValueError(f"{describe(op=op)}: tag must be an int in [0, {limit}), got {tag!r}")


class PeerWork(Work):
    """Base of a process transport's handle for one operation with one peer.

    Keeps what the handle's errors name (``op``, e.g. ``"recv tag 5"``, and the ``peer`` rank) and
    ``on_done``, which the subclass runs once the operation has completed.
    """

    def __init__(self, transport: Transport, op: str, peer: int, on_done: Callable[[], None] | None = None) -> None:
        self._transport = transport
        self._op = op
        self._peer = peer
        self._on_done = on_done

    def describe(self) -> str:
        """Prefix for this operation's error messages: transport, this rank, the peer, the operation."""
        return self._transport.describe(self._peer, self._op)

    def _limit(self, timeout: float | None) -> float:
        """Seconds ``wait(timeout)`` may block: ``timeout``, or the transport's default for ``None``."""
        return self._transport.timeout_s if timeout is None else max(0.0, float(timeout))

    def _timed_out(self, limit: float, what: str = "not complete", note: str = "") -> TransportTimeout:
        """The error of a wait that gave up after ``limit`` seconds."""
        return TransportTimeout(f"{self.describe()}: {what} after {limit:.1f} s{note}")


def unpack_object(data: bytes, src: int, describe: Callable[..., str]) -> Any:
    """The object in an object message from rank ``src``; malformed msgpack raises
    :class:`~.base.TransportError` naming the peer. Nothing is ever unpickled."""
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 - malformed msgpack
        raise TransportError(f"{describe(src, 'recv_object')}: malformed msgpack object: {exc}") from exc


def poll_until(test: Callable[[], bool], deadline: float, spin_s: float = 2e-4) -> bool:
    """Call ``test()`` until it returns True (-> True) or ``deadline`` (monotonic) passes (-> False)."""
    if test():
        return True
    start = time.monotonic()
    pause = 1e-5
    while True:
        now = time.monotonic()
        if now >= deadline:
            return test()
        if now - start > spin_s:
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 2e-4)
        if test():
            return True


class PendingSends:
    """Fire-and-forget sends (object messages) and the buffers they use, kept until done.

    Each entry has ``is_done()`` (non-blocking) and optionally ``finish(timeout_s)`` (blocking),
    for libraries whose handles only report completion through a wait (gloo). More than
    ``limit`` unfinished entries make :meth:`add` finish the oldest ones first.
    """

    def __init__(self, timeout_s: float, limit: int = 64) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[[], bool], Any, Callable[[float], None] | None]] = []
        self._timeout_s = timeout_s
        self._limit = limit

    def add(self, is_done: Callable[[], bool], keep_alive: Any, finish: Callable[[float], None] | None = None) -> None:
        with self._lock:
            self._items = [item for item in self._items if not _safe_done(item[0])]
            self._items.append((is_done, keep_alive, finish))
            overflow = self._items[: max(0, len(self._items) - self._limit)]
            del self._items[: len(overflow)]
        for item in overflow:
            self._finish(item, time.monotonic() + self._timeout_s)

    def drain(self, deadline: float) -> int:
        """Finish every pending send or give up at ``deadline``; the number left unfinished."""
        with self._lock:
            items, self._items = self._items, []
        return sum(not self._finish(item, deadline) for item in items)

    @staticmethod
    def _finish(item: tuple[Callable[[], bool], Any, Callable[[float], None] | None], deadline: float) -> bool:
        is_done, _, finish = item
        if finish is None:
            return poll_until(lambda: _safe_done(is_done), deadline)
        try:
            finish(max(0.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - the peer's own receive reports the failure
            return False
        return True


def _safe_done(is_done: Callable[[], bool]) -> bool:
    try:
        return bool(is_done())
    except Exception:  # noqa: BLE001 - a failed send is finished as far as keeping buffers goes
        return True
