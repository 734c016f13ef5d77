"""MPI transport (mpi4py), for jobs started by ``mpiexec``/``mpirun``/``srun``.

Which rank does what: there is no rendezvous of our own; the MPI launcher starts every rank and
:meth:`MPITransport.connect` imports ``mpi4py.MPI`` (which initialises MPI), checks that the rank
and world size given to the constructor match ``COMM_WORLD`` and duplicates ``COMM_WORLD`` three
times: one communicator for user tags, one for the default collectives (their tags sit above
MPI's ``TAG_UB``, so they are renumbered), one for object messages.

Data: tensors travel as raw bytes (``comm.Isend([array, MPI.BYTE], ...)``/``Irecv`` on the
tensor's own memory, every dtype viewed as ``uint8``, bfloat16 and float16 included). Objects are
msgpack bytes sent with ``Isend``/matched-probe ``Recv``; ``comm.send``/``comm.recv`` (which
pickle) are never used.

What ``wait`` means: host completion. :meth:`Work.wait` polls ``Request.Test()`` until the
request completes or the deadline passes, then raises :class:`~.base.TransportTimeout` naming the
peer. After a timeout the request stays posted; the job is expected to stop.

CUDA tensors: if MPI is CUDA-aware (``MPI.Query_cuda_support()``, mpi4py >= 4, or
``cuda_aware=True`` given to the constructor) the device memory is passed to MPI directly after
the current stream is synchronised. Otherwise each message is staged through a pinned host buffer
(taken from a small pool and reused): sends copy device -> host before ``Isend``; receives land
in host memory and are copied to the device when ``wait`` completes.

Failures under ``mpiexec``: a rank that dies takes the job down (the launcher kills the others).
A rank that *raises* must also end the job with a non-zero code, otherwise the other ranks block
in MPI until their own timeouts: run the script with ``mpiexec -n N python -m mpi4py script.py``
or call :func:`install_abort_on_error` at start-up (an uncaught exception prints its traceback
and calls ``COMM_WORLD.Abort(1)``).
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch

from ._common import COLLECTIVE_TAG_SPAN, PeerWork, PendingSends, host_bytes, poll_until, unpack_object
from .base import COLLECTIVE_TAG_BASE, Transport, TransportError, TransportTimeout, Work, tensor_nbytes

__all__ = ["MPITransport", "install_abort_on_error"]

_INSTALL_HINT = (
    "the mpi transport needs mpi4py and an MPI library: pip install mpi4py mpich (or use your cluster's MPI)"
)


def _import_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc
    return MPI


def install_abort_on_error() -> None:
    """Make an uncaught exception abort the whole MPI job (exit code 1).

    Prints the traceback first. Equivalent to running under ``python -m mpi4py``. Imports (and so
    initialises) MPI.
    """
    MPI = _import_mpi()
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        try:
            previous(exc_type, exc, tb)
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            MPI.COMM_WORLD.Abort(1)

    sys.excepthook = hook


class _HostPool:
    """Pinned host buffers for staging CUDA tensors, reused by size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = collections.defaultdict(list)

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            if self._free[nbytes]:
                return self._free[nbytes].pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free[buf.numel()].append(buf)


class _MPIWork(PeerWork):
    """One MPI request; ``wait`` polls ``Test()`` until a deadline."""

    _transport: MPITransport

    def __init__(
        self,
        transport: MPITransport,
        request: Any,
        op: str,
        peer: int,
        expected_nbytes: int | None = None,
        on_done: Callable[[], None] | None = None,
        keep_alive: Any = None,
    ) -> None:
        super().__init__(transport, op, peer, on_done)
        self._req = request
        self._expected = expected_nbytes
        self._keep_alive = keep_alive
        self._status = transport._MPI.Status()
        self._state = 0  # 0 pending, 1 done
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def _test(self) -> bool:
        with self._lock:
            if self._state:
                return True
            try:
                flag = self._req.Test(self._status)
            except self._transport._MPI.Exception as exc:
                self._error = TransportError(f"{self.describe()}: MPI error: {exc}")
                self._state = 1
                return True
            if not flag:
                return False
            self._state = 1
            if self._expected is not None:
                got = self._status.Get_count(self._transport._MPI.BYTE)
                if got != self._expected:
                    self._error = TransportError(
                        f"{self.describe()}: message of {got} bytes "
                        f"does not fit receive buffer of {self._expected} bytes"
                    )
                    return True
            try:
                if self._on_done is not None:
                    self._on_done()
            except BaseException as exc:  # noqa: BLE001 - surfaced by wait
                self._error = exc
            self._keep_alive = None
            return True

    def is_completed(self) -> bool:
        return self._test()

    def wait(self, timeout: float | None = None) -> None:
        limit = self._limit(timeout)
        if not poll_until(self._test, time.monotonic() + limit):
            raise self._timed_out(limit)
        if self._error is not None:
            raise self._error


class MPITransport(Transport):
    """One rank of an MPI job.

    Args:
        rank, world_size: as the launcher says (checked against ``COMM_WORLD`` in :meth:`connect`).
        timeout_s: default timeout of every wait.
        device: where buffers live (``"cpu"`` or ``"cuda[:N]"``).
        cuda_aware: pass CUDA memory to MPI directly; ``None`` asks mpi4py (``Query_cuda_support``).
    """

    name = "mpi"

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float = 60.0,
        *,
        device: str = "cpu",
        cuda_aware: bool | None = None,
    ) -> None:
        super().__init__(rank, world_size, timeout_s)
        self.device = torch.device(device)
        self.cuda_aware = cuda_aware
        self._MPI: Any = None
        self._data: Any = None
        self._coll: Any = None
        self._obj: Any = None
        self._tag_ub = 32767
        self._pool = _HostPool()
        self._pending = PendingSends(self.timeout_s)
        self._object_lock = threading.Lock()

    # ----------------------------------------------------------------- lifecycle
    def connect(self) -> MPITransport:
        """Initialise MPI (if needed), check rank and size, duplicate the communicators."""
        if self._connected:
            return self
        MPI = _import_mpi()
        world = MPI.COMM_WORLD
        if world.Get_rank() != self.rank or world.Get_size() != self.world_size:
            raise TransportError(
                f"{self.describe(op='connect')}: MPI COMM_WORLD says rank {world.Get_rank()} of "
                f"{world.Get_size()}; the launcher fields disagree"
            )
        self._MPI = MPI
        tag_ub = world.Get_attr(MPI.TAG_UB)
        self._tag_ub = int(tag_ub) if tag_ub else 32767
        if self.cuda_aware is None:
            query = getattr(MPI, "Query_cuda_support", None)
            self.cuda_aware = bool(query()) if query is not None else False
        self._data = world.Dup()
        self._coll = world.Dup()
        self._obj = world.Dup()
        self._connected = True
        return self

    def _close(self) -> None:
        """Give pending object sends up to 2 s, then free the communicators (MPI stays initialised)."""
        self._pending.drain(time.monotonic() + min(self.timeout_s, 2.0))
        for comm in (self._data, self._coll, self._obj):
            try:
                comm.Free()
            except Exception:  # noqa: BLE001 - MPI may already be finalised
                pass

    # ----------------------------------------------------------------- helpers
    def _checked_route(self, buf: torch.Tensor, peer: int, tag: int, op: str) -> tuple[Any, int]:
        """Check a point-to-point call's buffer, peer and state; its (communicator, MPI tag)."""
        self._check_message(buf, peer, op)
        self._check_device(buf, op)
        self._require(op)
        return self._route(tag, op)

    def _route(self, tag: int, op: str) -> tuple[Any, int]:
        """(communicator, MPI tag) for a transport tag."""
        if isinstance(tag, bool) or not isinstance(tag, int) or tag < 0:
            raise ValueError(f"{self.describe(op=op)}: tag must be a non-negative int, got {tag!r}")
        if tag >= COLLECTIVE_TAG_BASE:
            offset = tag - COLLECTIVE_TAG_BASE
            if offset >= COLLECTIVE_TAG_SPAN:
                raise ValueError(f"{self.describe(op=op)}: tag {tag} is in the reserved range")
            return self._coll, offset % (self._tag_ub + 1)
        if tag > self._tag_ub:
            raise ValueError(f"{self.describe(op=op)}: tag {tag} exceeds this MPI's TAG_UB {self._tag_ub}")
        return self._data, tag

    def _check_device(self, buf: torch.Tensor, op: str) -> None:
        # host buffers always travel (the default barrier's token is one, on a CUDA transport too)
        if buf.device.type not in (self.device.type, "cpu"):
            raise ValueError(f"{self.describe(op=op)}: buffer is on {buf.device}, this transport uses {self.device}")

    def _device_bytes(self, buf: torch.Tensor) -> torch.Tensor:
        flat = buf.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        return flat.view(torch.uint8)

    def _wire_memory(self, buf: torch.Tensor, nbytes: int) -> tuple[Any, torch.Tensor | None]:
        """(the memory MPI reads or writes for ``buf``, the pinned staging buffer or ``None``).

        A CPU buffer travels from its own memory, a CUDA buffer too when MPI is CUDA-aware (after
        the current stream is synchronised); otherwise a pinned host buffer from the pool stands
        in, and the caller copies between it and the device."""
        if buf.device.type == "cpu":
            return host_bytes(buf), None
        if self.cuda_aware:
            torch.cuda.current_stream(buf.device).synchronize()
            return self._device_bytes(buf), None
        host = self._pool.take(nbytes)
        return host.numpy(), host

    def _post(self, start: Callable[..., Any], mem: Any, peer: int, mtag: int, op: str) -> Any:
        """``start`` (a communicator's ``Isend`` or ``Irecv``) on ``mem``; MPI errors name the peer."""
        MPI = self._MPI
        try:
            return start([mem, MPI.BYTE], peer, mtag)
        except MPI.Exception as exc:
            raise TransportError(f"{self.describe(peer, op)}: MPI error: {exc}") from exc

    # ----------------------------------------------------------------- point to point
    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        comm, mtag = self._checked_route(buf, dst, tag, "isend")
        nbytes = tensor_nbytes(buf)
        op = f"send tag {tag}"
        mem, host = self._wire_memory(buf, nbytes)
        on_done = None
        if host is not None:  # staged: device -> pinned host before MPI reads it
            host.copy_(self._device_bytes(buf))
            on_done = lambda: self._pool.give(host)  # noqa: E731
        req = self._post(comm.Isend, mem, dst, mtag, op)
        self.counters.add_sent(nbytes)
        return _MPIWork(self, req, op, dst, on_done=on_done, keep_alive=(buf, host, mem))

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        comm, mtag = self._checked_route(buf, src, tag, "irecv")
        nbytes = tensor_nbytes(buf)
        op = f"recv tag {tag}"
        mem, host = self._wire_memory(buf, nbytes)

        def on_done() -> None:
            if host is not None:  # staged: pinned host -> device once MPI has written it
                self._device_bytes(buf).copy_(host)
                self._pool.give(host)
            self.counters.add_received(nbytes)

        req = self._post(comm.Irecv, mem, src, mtag, op)
        return _MPIWork(self, req, op, src, expected_nbytes=nbytes, on_done=on_done, keep_alive=(buf, host, mem))

    # ----------------------------------------------------------------- objects
    def send_object(self, obj: Any, dst: int) -> None:
        self._check_peer(dst, "send_object")
        self._require("send_object")
        MPI = self._MPI
        data = msgpack.packb(obj, use_bin_type=True)
        req = self._obj.Isend([data, MPI.BYTE], dst, 0)
        self._pending.add(req.Test, (req, data))
        self.counters.add_sent(0, len(data))

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        self._check_peer(src, "recv_object")
        self._require("recv_object")
        MPI = self._MPI
        limit = self.timeout_s if timeout is None else timeout
        status = MPI.Status()
        found: list[Any] = []

        def probe() -> bool:
            msg = self._obj.Improbe(src, 0, status)
            if msg is not None:
                found.append(msg)
                return True
            return False

        with self._object_lock:
            if not poll_until(probe, time.monotonic() + limit):
                raise TransportTimeout(f"{self.describe(src, 'recv_object')}: no object after {limit:.1f} s")
            n = status.Get_count(MPI.BYTE)
            data = bytearray(n)
            found[0].Recv([data, MPI.BYTE])
        self.counters.add_received(0, n)
        return unpack_object(bytes(data), src, self.describe)
