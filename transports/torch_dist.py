"""torch.distributed transport: NCCL for CUDA tensors, gloo for CPU tensors.

Which rank does what:

* Every rank calls :meth:`TorchDistTransport.connect`, which joins the process group through
  ``init_method="tcp://{master_addr}:{master_port}"``: rank 0 hosts the TCP store on that port,
  the others connect to it. The rendezvous has an explicit timeout (``timeout_s``; gloo's own
  default would be 30 minutes). A rank that is missing makes every other rank raise
  :class:`~.base.TransportTimeout` after ``timeout_s``.
* With NCCL an extra gloo group (all ranks) carries the object messages, so objects never touch
  the GPU.

What ``wait`` means here:

* **gloo** (CPU, or CUDA buffers staged through host memory: below): host completion.
  ``Work.wait(timeout)`` calls torch's ``Work.wait`` with a ``timedelta``, which gloo honours:
  it raises after the timeout (mapped to :class:`~.base.TransportTimeout`). gloo then closes
  the connection to that peer, so the peer's own pending operations fail at once with
  :class:`~.base.PeerFailed` instead of waiting for their own timeouts: a timeout is fatal for
  the job, as it should be. gloo reports the completion of a point-to-point operation only
  inside ``wait``, so ``is_completed()`` stays False until ``wait`` has returned.
* **NCCL** (CUDA): ``isend``/``irecv`` only queue the operation; the first ``wait`` or
  ``is_completed`` on any of them launches everything queued so far as one
  ``batch_isend_irecv`` group (so a rank may post ``irecv`` then ``isend`` to a peer that does
  the same without deadlocking inside NCCL). ``wait`` then polls ``is_completed()`` until the
  communication kernels have finished (host completion, so the buffer may be used from any
  stream) or the deadline passes.

A peer that exits mid-run closes its gloo connections; the operations of the other ranks with it
fail within about a second with :class:`~.base.PeerFailed`.

CUDA buffers on gloo (``device="cuda"``, ``backend="gloo"``: several ranks sharing one GPU,
where NCCL refuses to run): gloo only reads and writes host memory, so a send copies the buffer
to the host first (synchronising the current stream) and a receive lands in host memory and is
copied to the device when ``wait`` completes. :meth:`barrier` sends its token on the transport's
device (NCCL carries no CPU tensors).

Limits: one :class:`TorchDistTransport` per process (torch.distributed keeps a process-wide
default group). On NCCL, tags are ignored: point-to-point messages between a pair of ranks are
matched in posting order, so both sides must post them in the same order. Receive buffers must
have exactly the sent size. The collectives are the default ones of :class:`~.base.Transport`
(point-to-point, bit-identical on every rank), not torch's.

Objects are msgpack bytes sent as a ``uint8`` tensor after an ``int64`` length header, both on a
reserved tag; torch's ``*_object`` functions (which pickle) are never used.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch

from ._common import OBJECT_TAG, PeerWork, PendingSends, check_tag, poll_until, unpack_object
from .base import PeerFailed, Transport, TransportError, TransportTimeout, Work, tensor_nbytes

__all__ = ["TorchDistTransport"]

#: Largest object message accepted (bytes of msgpack).
MAX_OBJECT_BYTES = 64 << 20


class _TorchWork(PeerWork):
    """Wraps ``torch.distributed`` Work handles and maps their errors to transport errors.

    ``works`` is None for an NCCL operation not launched yet: the first ``wait`` or
    ``is_completed`` launches every queued NCCL operation of this rank as one batch.
    """

    _transport: TorchDistTransport

    def __init__(
        self,
        transport: TorchDistTransport,
        works: list[Any] | None,
        op: str,
        peer: int,
        backend: str,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(transport, op, peer, on_done)
        self._works = works
        self._backend = backend
        self._done = False

    def _attach(self, works: list[Any]) -> None:
        self._works = works

    def _launched(self) -> list[Any]:
        if self._works is None:
            self._transport._flush_nccl()
        assert self._works is not None
        return self._works

    def is_completed(self) -> bool:
        # gloo's point-to-point handles only complete inside wait(): False until then
        return self._done or all(w.is_completed() for w in self._launched())

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        limit = self._limit(timeout)
        deadline = time.monotonic() + limit
        try:
            works = self._launched()
            if self._backend == "nccl":
                if not poll_until(lambda: all(w.is_completed() for w in works), deadline):
                    raise self._timed_out(limit)
                for w in works:
                    w.wait()
            else:
                for w in works:
                    remaining = max(deadline - time.monotonic(), 1e-3)
                    w.wait(datetime.timedelta(seconds=remaining))
        except TransportError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/DistError subclasses
            raise self._transport._map_error(exc, self._peer, self._op, limit) from exc
        self._done = True
        if self._on_done is not None:
            self._on_done()


class _Failed:
    """Stands in for a torch Work whose launch failed."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def is_completed(self) -> bool:
        return True

    def wait(self, *args: Any) -> None:
        raise self._error


class TorchDistTransport(Transport):
    """One rank of a torch.distributed job.

    Args:
        rank, world_size: this rank and the job size.
        timeout_s: rendezvous timeout and default timeout of every wait.
        master_addr, master_port: where rank 0 hosts the TCP store.
        device: ``"cpu"`` (gloo) or ``"cuda"``/``"cuda:N"`` (NCCL). Buffers must live there.
        backend: override the backend choice (``"gloo"`` or ``"nccl"``).

    The constructor only stores settings; :meth:`connect` joins the group.
    """

    name = "torch"

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float = 60.0,
        *,
        master_addr: str = "127.0.0.1",
        master_port: int = 29500,
        device: str = "cpu",
        backend: str | None = None,
    ) -> None:
        super().__init__(rank, world_size, timeout_s)
        self.master_addr = master_addr
        self.master_port = int(master_port)
        self.device = torch.device(device)
        if backend is None:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"{self.describe(op='init')}: backend must be 'gloo' or 'nccl', got {backend!r}")
        self.backend = backend
        self._dist: Any = None
        self._object_group: Any = None
        self._object_lock = threading.Lock()
        # NCCL needs sends and receives to a peer launched together (tested on gloo too)
        self._batch_p2p = backend == "nccl"
        self._nccl_lock = threading.Lock()
        self._nccl_queue: list[tuple[Any, _TorchWork]] = []
        self._pending = PendingSends(self.timeout_s)

    # ----------------------------------------------------------------- lifecycle
    def connect(self) -> TorchDistTransport:
        """Join the process group (collective over all ranks); returns ``self``."""
        if self._connected:
            return self
        import torch.distributed as dist

        if not dist.is_available():
            raise TransportError(f"{self.describe(op='connect')}: this torch build has no torch.distributed")
        if dist.is_initialized():
            raise TransportError(
                f"{self.describe(op='connect')}: a default process group already exists in this process "
                "(one TorchDistTransport per process)"
            )
        if self.backend == "nccl":
            if not torch.cuda.is_available() or not dist.is_nccl_available():
                raise TransportError(f"{self.describe(op='connect')}: NCCL needs CUDA and a torch build with NCCL")
            if self.device.index is not None:
                torch.cuda.set_device(self.device)
        init_method = f"tcp://{self.master_addr}:{self.master_port}"
        timeout = datetime.timedelta(seconds=self.timeout_s)
        try:
            dist.init_process_group(
                self.backend,
                init_method=init_method,
                rank=self.rank,
                world_size=self.world_size,
                timeout=timeout,
            )
            if self.backend == "nccl":
                self._object_group = dist.new_group(backend="gloo", timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - store timeouts come as several exception types
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            cls = TransportTimeout if "time" in text.lower() else TransportError
            raise cls(
                f"{self.describe(op='connect')}: rendezvous at {init_method} failed "
                f"(timeout {self.timeout_s:.1f} s): {text}"
            ) from exc
        self._dist = dist
        self._connected = True
        return self

    def _close(self) -> None:
        """Give pending object sends up to 2 s, then destroy the process group."""
        self._pending.drain(time.monotonic() + min(self.timeout_s, 2.0))
        dist = self._dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group still gets torn down as far as possible
                pass

    # ----------------------------------------------------------------- helpers
    def _check_point_to_point(self, buf: torch.Tensor, peer: int, tag: int, op: str) -> None:
        """Refuse a bad buffer, peer, tag or device before anything is posted."""
        self._check_message(buf, peer, op)
        check_tag(tag, op, self.describe)
        self._check_device(buf, op)

    def _check_device(self, buf: torch.Tensor, op: str) -> None:
        if buf.device.type != self.device.type:
            raise ValueError(f"{self.describe(op=op)}: buffer is on {buf.device}, this transport uses {self.device}")

    def _map_error(self, exc: BaseException, peer: int, op: str, limit: float) -> TransportError:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        low = text.lower()
        if "timed out" in low or ("timeout" in low and "pair closure" not in low):
            return TransportTimeout(f"{self.describe(peer, op)}: not complete after {limit:.1f} s ({first})")
        return PeerFailed(f"{self.describe(peer, op)}: {first}")

    # ----------------------------------------------------------------- point to point
    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        self._check_point_to_point(buf, dst, tag, "isend")
        work = self._post("isend", buf, dst, tag, f"send tag {tag}", None)
        self.counters.add_sent(tensor_nbytes(buf))
        return work

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        self._check_point_to_point(buf, src, tag, "irecv")
        nbytes = tensor_nbytes(buf)
        return self._post("irecv", buf, src, tag, f"recv tag {tag}", lambda: self.counters.add_received(nbytes))

    def _post(self, kind: str, buf: torch.Tensor, peer: int, tag: int, op: str, on_done: Any) -> _TorchWork:
        self._require(kind)
        dist = self._dist
        fn = dist.isend if kind == "isend" else dist.irecv
        if self.backend == "gloo" and buf.device.type != "cpu":  # gloo reads and writes host memory only
            if kind == "isend":
                buf = buf.detach().cpu()
            else:
                device_buf, buf, counted = buf, torch.empty(buf.shape, dtype=buf.dtype), on_done

                def on_done() -> None:
                    device_buf.copy_(buf)
                    counted()

        if self._batch_p2p:  # queued; launched as one batch by the first wait
            work = _TorchWork(self, None, op, peer, self.backend, on_done)
            with self._nccl_lock:
                self._nccl_queue.append((dist.P2POp(fn, buf, peer, tag=tag), work))
            return work
        try:
            handle = fn(buf, peer, tag=tag)
        except Exception as exc:  # noqa: BLE001
            raise self._map_error(exc, peer, op, self.timeout_s) from exc
        return _TorchWork(self, [handle], op, peer, "gloo", on_done)

    def _flush_nccl(self) -> None:
        """Launch every queued NCCL send/receive as one ``batch_isend_irecv`` group."""
        with self._nccl_lock:  # attach inside the lock: a concurrent waiter must see the handles
            queued, self._nccl_queue = self._nccl_queue, []
            if not queued:
                return
            try:
                handles = list(self._dist.batch_isend_irecv([op for op, _ in queued]) or [])
                if not handles:
                    raise TransportError("batch_isend_irecv returned no handles")
            except Exception as exc:  # noqa: BLE001
                for _, work in queued:
                    work._attach([_Failed(self._map_error(exc, work._peer, work._op, self.timeout_s))])
                return
            for i, (_, work) in enumerate(queued):
                # one handle per op, or one handle for the whole coalesced group
                work._attach([handles[i]] if len(handles) == len(queued) else handles)

    def barrier(self, timeout: float | None = None) -> None:
        """Return once every rank has entered the barrier (the token lives on this transport's
        device: NCCL carries no CPU tensors)."""
        token = torch.zeros(1, dtype=torch.uint8, device=self.device)
        self.all_reduce(token, "sum", timeout)

    # ----------------------------------------------------------------- objects
    def send_object(self, obj: Any, dst: int) -> None:
        self._check_peer(dst, "send_object")
        self._require("send_object")
        dist = self._dist
        data = msgpack.packb(obj, use_bin_type=True)
        header = torch.tensor([len(data)], dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            w1 = dist.isend(header, dst, group=self._object_group, tag=OBJECT_TAG)
            w2 = dist.isend(payload, dst, group=self._object_group, tag=OBJECT_TAG)
        except Exception as exc:  # noqa: BLE001
            raise self._map_error(exc, dst, "send_object", self.timeout_s) from exc
        works = [_TorchWork(self, [w], "send_object", dst, "gloo") for w in (w1, w2)]

        def finish(timeout: float) -> None:
            deadline = time.monotonic() + timeout
            for work in works:
                work.wait(max(0.0, deadline - time.monotonic()))

        self._pending.add(lambda: all(w.is_completed() for w in works), (header, payload), finish)
        self.counters.add_sent(0, header.numel() * 8 + len(data))

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        self._check_peer(src, "recv_object")
        self._require("recv_object")
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._object_lock:
            header = torch.zeros(1, dtype=torch.int64)
            self._recv_object_part(header, src, "header", deadline)
            n = int(header.item())
            if not 0 < n <= MAX_OBJECT_BYTES:
                raise TransportError(f"{self.describe(src, 'recv_object')}: bad object length {n}")
            payload = torch.empty(n, dtype=torch.uint8)
            self._recv_object_part(payload, src, "body", deadline)
        self.counters.add_received(0, 8 + n)
        return unpack_object(payload.numpy().tobytes(), src, self.describe)

    def _recv_object_part(self, buf: torch.Tensor, src: int, part: str, deadline: float) -> None:
        """Receive one part of an object message (``header`` or ``body``) on the object group."""
        work = self._dist.irecv(buf, src, group=self._object_group, tag=OBJECT_TAG)
        _TorchWork(self, [work], f"recv_object ({part})", src, "gloo").wait(max(0.0, deadline - time.monotonic()))
