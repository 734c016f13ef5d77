"""ZeroMQ transport (pyzmq + msgpack): works over any TCP network, no MPI or NCCL needed.

Sockets, and why: every rank binds one **ROUTER** (inbound) on ``bind_addr`` and connects one
**DEALER** (outbound) to each peer's ROUTER. A ROUTER tags every inbound message with the
connection it came on, so after the handshake each connection is bound to one peer rank and a
header that claims another source is rejected; PULL sockets would lose that. DEALER/ROUTER never
drop messages (high-water marks are off) and keep per-connection order, which gives the
"same (src, dst, tag): first posted, first matched" rule.

Which rank does what in :meth:`ZmqTransport.connect`:

1. Every rank binds its ROUTER (``port_range=(lo, hi)`` to stay inside a firewall's range;
   ``None`` lets the OS pick) and learns its endpoint.
2. Rendezvous: rank 0 binds ``bind_addr:master_port``; every other rank registers
   ``(rank, world_size, config_hash, endpoint)`` there. Rank 0 rejects registrations with another
   protocol, world size or ``config_hash`` (the rejected rank raises at once; rank 0 keeps waiting
   and lists the rejections if it times out), then sends every rank the endpoint table and a
   random job id.
3. Handshake: each rank sends a HELLO (protocol version, world size, ``config_hash``, job id) to
   every peer's ROUTER; the peer binds that connection to the sender's rank and answers ACK, or
   REJECT with the reason (the sender then raises :class:`~.base.TransportError`). So two
   different jobs, or ranks with different configs, refuse to talk. ``connect`` returns once this
   rank has an ACK from every peer and has answered every peer's HELLO.

Data path, and who does what: there is no Python I/O thread. The calling thread sends on its
DEALERs directly (``[header, payload]``, the payload without copying from 64 KiB up); libzmq's own
I/O thread, which runs without Python's GIL, moves bytes between the sockets and the kernel in
both directions, so messages flow while the caller computes. Inbound messages wait in libzmq's
queue until a thread *waits*: every ``wait``, ``is_completed`` and ``recv_object`` drains the
ROUTER (MPI's progress rule: a transport makes progress inside its calls). So a compute thread
that posts ~100 messages a step is never preempted by a Python thread that wants the GIL for each
of them (docs/BENCHMARKS.md measured what that cost). The header is a msgpack map
``{v, k, src, dst, tag, dtype, nbytes}``. Every inbound message is validated strictly: size
limits, a msgpack map with exactly the expected fields and types, the protocol version, ``src``
equal to the connection's rank, ``dst`` equal to this rank, a known dtype, and a payload frame of
exactly ``nbytes``. A message that fails (a pickle, malformed msgpack, a lie about its size...) is
dropped, logged, recorded in :attr:`ZmqTransport.rejected` and quoted in any later timeout error
for that peer; other messages keep flowing. A well-formed message whose dtype or size does not fit
the receive buffer it matches fails that receive with a clear error. Nothing received is ever
unpickled. A message drained before its ``irecv`` is held (by reference, no copy) until matched.

What ``wait`` means: host completion. A send is complete when ZeroMQ no longer needs the buffer
(it has been handed to the kernel); a receive when the payload has been copied into the caller's
buffer. CUDA buffers are staged through host memory (a synchronous copy).

Failures: a peer that closes its transport sends BYE, and a receive from it that can no longer be
matched raises :class:`~.base.PeerFailed` at once. A peer whose connection drops without BYE (it
crashed or was killed) is marked failed ``peer_grace_s`` after a wait first sees the drop; its
pending and future operations raise :class:`~.base.PeerFailed`. A peer that is alive but silent
makes waits raise :class:`~.base.TransportTimeout` after the timeout. There is no authentication: ``config_hash`` is
a consistency check, not a secret.

Bytes: ``payload_*`` counts tensor bytes; ``framing_*`` counts header frames and object messages.
"""

from __future__ import annotations

import collections
import logging
import secrets
import socket
import threading
import time
from typing import Any

import msgpack
import numpy as np
import torch

from ._common import PeerWork, check_tag, host_bytes, unpack_object
from ._zmq_protocol import (
    DTYPE_NAMES,
    DTYPES,
    MAX_OBJECT,
    MAX_REJECTIONS,
    PROTOCOL_VERSION,
    Rejected,
    decode,
    identity,
    identity_mismatch,
    pack,
)
from ._zmq_rendezvous import rendezvous
from .base import PeerFailed, Transport, TransportError, TransportTimeout, Work, tensor_nbytes

__all__ = ["PROTOCOL_VERSION", "ZmqTransport"]

logger = logging.getLogger(__name__)


class _SendWork(PeerWork):
    _transport: ZmqTransport

    def __init__(self, transport: ZmqTransport, tracker: Any, dst: int, tag: int) -> None:
        super().__init__(transport, f"send tag {tag}", dst)
        self._tracker = tracker

    def is_completed(self) -> bool:
        return self._tracker is None or bool(self._tracker.done)

    def wait(self, timeout: float | None = None) -> None:
        import zmq

        t = self._transport
        limit = self._limit(timeout)
        deadline = time.monotonic() + limit
        while not self.is_completed():
            # libzmq releases the buffer from its own I/O thread; draining inbound messages here
            # lets a goodbye or a dropped connection from the peer end the wait early
            t._progress(0.0)
            t._raise_if_broken(self._peer, self._op)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(limit, "not sent")
            try:
                self._tracker.wait(min(remaining, 0.05))
            except zmq.NotDone:
                pass


class _RecvWork(PeerWork):
    _transport: ZmqTransport

    def __init__(self, transport: ZmqTransport, buf: torch.Tensor, src: int, tag: int) -> None:
        super().__init__(transport, f"recv tag {tag}", src)
        self.buf = buf
        self._event = threading.Event()
        self.error: BaseException | None = None

    def complete(self, error: BaseException | None = None) -> None:
        self.error = error
        self._event.set()

    def is_completed(self) -> bool:
        if not self._event.is_set():
            self._transport._progress(0.0)
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        t = self._transport
        limit = self._limit(timeout)
        deadline = time.monotonic() + limit
        while not self._event.is_set():
            t._raise_if_broken(self._peer, self._op)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(limit, "no message", t._rejection_note(self._peer))
            t._progress(min(remaining, 0.05))
        if self.error is not None:
            raise self.error


class ZmqTransport(Transport):
    """One rank of a ZeroMQ job.

    Args:
        rank, world_size, timeout_s: as every transport (``timeout_s`` also bounds ``connect``).
        master_addr, master_port: rank 0's rendezvous address (rank 0 binds ``bind_addr:master_port``).
        bind_addr: interface to bind (``"0.0.0.0"`` for all; then set ``advertise_addr``).
        advertise_addr: address peers use to reach this rank (default: ``bind_addr``, or the host's
            address when binding all interfaces).
        port_range: ``(lo, hi)`` inclusive for the data port; ``None`` or ``(0, 0)``: any free port.
        config_hash: a digest of the job's config; ranks with different values refuse to talk.
        device: where buffers live (CUDA buffers are staged through host memory).
        peer_grace_s: how long a dropped connection may wait for a BYE before the peer is failed.

    Threads: any thread may call any method. Sends hold ``_send_lock`` (the DEALERs); draining
    inbound messages holds ``_recv_lock`` (the ROUTER and the connection monitors); the matching
    tables are guarded by ``_lock``. The transport starts no Python thread (libzmq runs its own I/O
    thread, and pyzmq a thread that frees zero-copy frames).
    """

    name = "zmq"

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float = 60.0,
        *,
        master_addr: str = "127.0.0.1",
        master_port: int = 29600,
        bind_addr: str = "127.0.0.1",
        advertise_addr: str | None = None,
        port_range: tuple[int, int] | None = None,
        config_hash: str = "",
        device: str = "cpu",
        peer_grace_s: float = 0.5,
    ) -> None:
        super().__init__(rank, world_size, timeout_s)
        if port_range is not None:
            lo, hi = port_range
            if not (0 <= lo <= hi <= 65535):
                raise ValueError(
                    f"{self.describe(op='init')}: port_range must be 0 <= lo <= hi <= 65535, got {port_range}"
                )
        self.master_addr = master_addr
        self.master_port = int(master_port)
        self.bind_addr = bind_addr
        self.advertise_addr = advertise_addr
        self.port_range = None if port_range in (None, (0, 0)) else (int(port_range[0]), int(port_range[1]))
        self.config_hash = str(config_hash)
        self.device = torch.device(device)
        self.peer_grace_s = float(peer_grace_s)
        #: reasons of the inbound messages this rank rejected (newest last, at most 100)
        self.rejected: list[str] = []
        self.endpoint: str | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._posted: dict[tuple[int, int], collections.deque[_RecvWork]] = collections.defaultdict(collections.deque)
        self._unexpected: dict[tuple[int, int], collections.deque[tuple[dict, Any, int]]] = collections.defaultdict(
            collections.deque
        )
        self._objects: dict[int, collections.deque[tuple[bytes, int]]] = collections.defaultdict(collections.deque)
        self._gone: dict[int, str] = {}  # peer -> why it can no longer send (bye or failure)
        self._last_rejection: dict[int, str] = {}
        self._fatal: str | None = None
        self._acked: set[int] = set()  # peers that answered this rank's HELLO with ACK
        self._ident_rank: dict[bytes, int] = {}  # inbound connection -> the peer its HELLO named
        self._suspects: dict[int, float] = {}  # peer -> when its connection was seen dropped
        self._zmq: Any = None
        self._ctx: Any = None
        self._router: Any = None
        self._dealers: dict[int, Any] = {}
        self._monitors: dict[int, Any] = {}
        self._poller: Any = None
        self._job = ""

    # ================================================================ connect
    def connect(self) -> ZmqTransport:
        """Bind, rendezvous through rank 0, handshake with every peer; returns ``self``."""
        if self._connected:
            return self
        if self._closed:
            raise TransportError(f"{self.describe(op='connect')}: transport is closed")
        self._connected = True  # before any socket opens, so that close() releases what did
        if self.world_size == 1:
            return self
        try:
            import zmq
        except ImportError as exc:
            raise ImportError(f"the zmq transport needs pyzmq: pip install pyzmq ({exc})") from exc
        self._zmq = zmq
        deadline = time.monotonic() + self.timeout_s
        self._ctx = zmq.Context()
        try:
            self._router = self._bind_router()
            job, endpoints = rendezvous(self, self._ctx, deadline)
            self._job = job
            self._open_dealers(endpoints)
            self._handshake(deadline)
        except BaseException:
            self.close()
            raise
        return self

    def _bind_router(self) -> Any:
        zmq = self._zmq
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.LINGER, 1000)
        base = f"tcp://{self.bind_addr}"
        try:
            if self.port_range is None:
                router.bind(f"{base}:*")
                port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
            else:
                lo, hi = self.port_range
                port = router.bind_to_random_port(base, min_port=lo, max_port=hi + 1, max_tries=min(hi - lo + 1, 1000))
        except zmq.ZMQError as exc:
            router.close(0)
            raise TransportError(
                f"{self.describe(op='connect')}: cannot bind a data port on {self.bind_addr} "
                f"(port_range {self.port_range}): {exc}"
            ) from exc
        host = self.advertise_addr or self.bind_addr
        if host in ("0.0.0.0", "*", ""):
            host = socket.gethostbyname(socket.gethostname())
        self.endpoint = f"tcp://{host}:{port}"
        return router

    def _open_dealers(self, endpoints: list[str]) -> None:
        """One DEALER (and a monitor of its connection) to every peer's ROUTER."""
        zmq = self._zmq
        for peer, endpoint in enumerate(endpoints):
            if peer == self.rank:
                continue
            dealer = self._ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.SNDHWM, 0)
            dealer.setsockopt(zmq.RCVHWM, 0)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.setsockopt(zmq.ROUTING_ID, f"{self._job}:{self.rank}:{secrets.token_hex(4)}".encode())
            self._monitors[peer] = dealer.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            dealer.connect(endpoint)
            self._dealers[peer] = dealer
        self._poller = zmq.Poller()
        for sock in (self._router, *self._monitors.values()):
            self._poller.register(sock, zmq.POLLIN)

    def _handshake(self, deadline: float) -> None:
        """HELLO to every peer; return once every peer has ACKed it and this rank has answered
        every peer's HELLO (so no peer is left waiting for an answer this rank would only give
        inside a later wait)."""
        zmq = self._zmq
        peers = self.world_size - 1
        dealer_peer = {sock: peer for peer, sock in self._dealers.items()}
        answers = zmq.Poller()
        for sock in dealer_peer:
            answers.register(sock, zmq.POLLIN)
        with self._send_lock:
            who = identity(self.world_size, self.config_hash)
            for peer, dealer in self._dealers.items():
                dealer.send(pack("hello", src=self.rank, dst=peer, job=self._job, **who))
            while True:
                if self._closed:
                    raise TransportError(f"{self.describe(op='connect')}: transport closed during the handshake")
                if self._fatal is not None:
                    raise TransportError(f"{self.describe(op='connect')}: {self._fatal}")
                answered = len(set(self._ident_rank.values()))
                if len(self._acked) == peers and answered == peers:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.world_size)) - self._acked - {self.rank})
                    silent = sorted(set(range(self.world_size)) - set(self._ident_rank.values()) - {self.rank})
                    raise TransportTimeout(
                        f"{self.describe(op='connect')}: no handshake answer from ranks {missing}, no HELLO "
                        f"from ranks {silent} after {self.timeout_s:.1f} s{self._rejection_note(None)}"
                    )
                for sock, _ in answers.poll(min(remaining, 0.01) * 1000):
                    self._drain_dealer(sock, dealer_peer[sock])
                self._progress(min(remaining, 0.01))

    # ================================================================ progress
    def progress(self, timeout: float = 0.0) -> None:
        """Take in what has arrived (matching receives, answering handshakes, noticing peers
        that left), waiting up to ``timeout`` seconds for a first message. Waits do this on their
        own; a rank that will not wait for a long while may call it to answer a peer sooner."""
        self._require("progress")
        self._progress(float(timeout))

    def _progress(self, timeout: float) -> None:
        """Drain inbound messages into their receives, waiting up to ``timeout`` seconds for the
        first; watch the connections. Called inside every wait, on the waiting thread."""
        if self._poller is None or self._closed:
            return
        if not self._recv_lock.acquire(timeout=max(0.0, timeout)):
            return  # another thread is draining; the caller checks its event again
        try:
            if self._closed:
                return
            ready = dict(self._poller.poll(max(0.0, timeout) * 1000))
            if self._router in ready:
                self._drain_router()
            for peer, sock in self._monitors.items():
                if sock in ready:
                    self._read_monitor(peer, sock)
            if self._suspects:
                self._drain_router()  # a goodbye that raced the disconnect wins
                now = time.monotonic()
                for peer, since in list(self._suspects.items()):
                    if peer in self._gone:
                        del self._suspects[peer]
                    elif now - since >= self.peer_grace_s:
                        del self._suspects[peer]
                        self._mark_gone(peer, "connection lost without a goodbye (the peer process died?)", True)
        finally:
            self._recv_lock.release()

    def _read_monitor(self, peer: int, sock: Any) -> None:
        from zmq.utils.monitor import recv_monitor_message

        zmq = self._zmq
        while sock.poll(0):
            event = recv_monitor_message(sock)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                self._suspects.setdefault(peer, time.monotonic())
            elif event == zmq.EVENT_CONNECTED:
                self._suspects.pop(peer, None)

    def _drain_dealer(self, sock: Any, peer: int) -> None:
        zmq = self._zmq
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 1:
                    raise Rejected(f"expected 1 frame on the handshake path, got {len(frames)}")
                msg = decode(frames[0], ("ack", "reject"))
                if msg["src"] != peer or msg["dst"] != self.rank:
                    raise Rejected(f"handshake answer claims src {msg['src']} dst {msg['dst']}")
            except Rejected as exc:
                self._reject(peer, str(exc))
                continue
            if msg["k"] == "reject":
                self._fatal = f"rank {peer} refused the handshake: {msg['reason']}"
            else:
                self._acked.add(peer)

    def _drain_router(self) -> None:
        zmq = self._zmq
        router = self._router
        while True:
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = frames[0].bytes
            peer = self._ident_rank.get(ident)
            try:
                self._handle_inbound(router, ident, peer, frames[1:])
            except Rejected as exc:
                self._reject(peer, str(exc))

    def _handle_inbound(self, router: Any, ident: bytes, peer: int | None, rest: list[Any]) -> None:
        if not rest or len(rest) > 2:
            raise Rejected(f"expected 1 or 2 frames, got {len(rest)}")
        header_bytes = rest[0].bytes
        msg = decode(header_bytes, ("t", "o", "bye", "hello"))
        kind = msg["k"]
        if kind == "hello":
            reason = self._check_hello(msg, peer, len(rest))
            if reason:
                router.send_multipart([ident, pack("reject", src=self.rank, dst=msg["src"], reason=reason)])
                raise Rejected(f"handshake refused: {reason}")
            self._ident_rank[ident] = msg["src"]
            router.send_multipart([ident, pack("ack", src=self.rank, dst=msg["src"])])
            return
        if peer is None:
            raise Rejected(f"{kind!r} message on a connection that has not completed the handshake")
        if msg["src"] != peer or msg["dst"] != self.rank:
            raise Rejected(
                f"header says src {msg['src']} dst {msg['dst']} on rank {peer}'s connection to rank {self.rank}"
            )
        if kind == "bye":
            self._mark_gone(peer, "closed its transport (goodbye received)", False)
            return
        if len(rest) != 2:
            raise Rejected(f"{kind!r} message needs a header and a payload frame, got {len(rest)} frames")
        payload = rest[1]
        size = len(payload.buffer)
        if msg["nbytes"] != size:
            raise Rejected(f"header announces {msg['nbytes']} payload bytes, the payload frame has {size}")
        if kind == "o":
            if size > MAX_OBJECT:
                raise Rejected(f"object message of {size} bytes exceeds {MAX_OBJECT}")
            with self._lock:
                self._objects[peer].append((payload.bytes, len(header_bytes)))
            return
        dtype = DTYPES.get(msg["dtype"])
        if dtype is None:
            raise Rejected(f"unknown dtype {msg['dtype']!r}")
        if size % dtype.itemsize:
            raise Rejected(f"{size} bytes is not a whole number of {msg['dtype']} elements")
        key = (peer, msg["tag"])
        with self._lock:
            waiting = self._posted.get(key)
            work = waiting.popleft() if waiting else None
            if work is None:
                self._unexpected[key].append((msg, payload, len(header_bytes)))
                return
        self._fill(work, msg, payload, len(header_bytes))

    def _check_hello(self, msg: dict[str, Any], peer: int | None, nframes: int) -> str:
        if nframes != 1:
            return f"hello has {nframes} frames, expected 1"
        mismatch = identity_mismatch(msg, self.world_size, self.config_hash, "this rank's")
        if mismatch:
            return mismatch
        if msg["job"] != self._job:
            return f"job id {msg['job']!r} is not this job's {self._job!r} (another job?)"
        if msg["dst"] != self.rank or not 0 <= msg["src"] < self.world_size or msg["src"] == self.rank:
            return f"hello from rank {msg['src']} to rank {msg['dst']} makes no sense here"
        if peer is not None or msg["src"] in self._ident_rank.values():
            return f"rank {msg['src']} already completed the handshake"
        return ""

    def _fill(self, work: _RecvWork, msg: dict[str, Any], payload: Any, header_len: int) -> None:
        buf = work.buf
        nbytes = tensor_nbytes(buf)
        if msg["dtype"] != DTYPE_NAMES.get(buf.dtype) or msg["nbytes"] != nbytes:
            work.complete(
                TransportError(
                    f"{work.describe()}: message of {msg['nbytes']} bytes "
                    f"{msg['dtype']} does not fit receive buffer {tuple(buf.shape)} {buf.dtype} ({nbytes} bytes)"
                )
            )
            return
        try:
            if nbytes:
                src = np.frombuffer(payload.buffer, dtype=np.uint8)
                if buf.device.type == "cpu":
                    host_bytes(buf)[:] = src
                else:
                    host = torch.empty(nbytes, dtype=torch.uint8)
                    host.numpy()[:] = src
                    buf.reshape(-1).view(torch.uint8).copy_(host)
        except Exception as exc:  # noqa: BLE001 - reported to the waiter
            work.complete(TransportError(f"{work.describe()}: copy failed: {exc}"))
            return
        self.counters.add_received(nbytes, header_len)
        work.complete()

    def _reject(self, peer: int | None, reason: str) -> None:
        who = f"rank {peer}" if peer is not None else "an unknown sender"
        text = f"{self.describe(peer, 'receive')}: rejected a message from {who}: {reason}"
        logger.warning("%s", text)
        with self._lock:
            self.rejected.append(text)
            del self.rejected[:-MAX_REJECTIONS]
            if peer is not None:
                self._last_rejection[peer] = reason

    def _mark_gone(self, peer: int, reason: str, failed: bool) -> None:
        """Peer ``peer`` will send nothing more: fail its receives that can never match."""
        with self._lock:
            if peer in self._gone:
                return
            self._gone[peer] = reason
            stranded = []
            for (src, _tag), queue in self._posted.items():
                if src == peer:
                    stranded.extend(queue)
                    queue.clear()
        if failed:
            logger.error("%s: %s", self.describe(peer, "receive"), reason)
        for work in stranded:
            work.complete(PeerFailed(f"{work.describe()}: peer {reason}"))

    # ================================================================ helpers for callers
    def _rejection_note(self, peer: int | None) -> str:
        with self._lock:
            if peer is not None and peer in self._last_rejection:
                return f"; a message from this peer was rejected: {self._last_rejection[peer]}"
            if peer is None and self.rejected:
                return f"; last rejection: {self.rejected[-1]}"
        return ""

    def _raise_if_broken(self, peer: int, op: str) -> None:
        if self._fatal is not None:
            raise TransportError(f"{self.describe(peer, op)}: {self._fatal}")
        if self._closed:
            raise TransportError(f"{self.describe(peer, op)}: transport is closed")
        reason = self._gone.get(peer)
        if reason is not None:
            raise PeerFailed(f"{self.describe(peer, op)}: peer {reason}")

    def _send_frames(self, dst: int, frames: list[Any], track: bool, op: str) -> Any:
        """Queue ``frames`` on ``dst``'s DEALER (never blocks: high-water marks are off); the
        tracker of the last frame when ``track``."""
        zmq = self._zmq
        with self._send_lock:
            if self._closed:
                raise TransportError(f"{self.describe(dst, op)}: transport is closed")
            try:
                return self._dealers[dst].send_multipart(frames, copy=False, track=track, flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                reason = f"cannot queue a message: {exc}"
        self._mark_gone(dst, reason, True)
        raise PeerFailed(f"{self.describe(dst, op)}: peer {reason}")

    def _inject_frames(self, dst: int, frames: list[bytes]) -> None:
        """Send raw frames to ``dst`` on the data path, bypassing the encoder (for tests only)."""
        self._require("inject")
        self._send_frames(dst, list(frames), False, "inject")

    # ================================================================ point to point
    def _check_point_to_point(self, buf: torch.Tensor, peer: int, tag: int, op: str) -> None:
        """Refuse a bad buffer, peer or tag, or a transport not connected or closed."""
        self._check_message(buf, peer, op)
        check_tag(tag, op, self.describe, 1 << 62)
        self._require(op)

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        self._check_point_to_point(buf, dst, tag, "isend")
        self._raise_if_broken(dst, f"send tag {tag}")
        dtype = DTYPE_NAMES.get(buf.dtype)
        if dtype is None:
            raise ValueError(f"{self.describe(dst, 'isend')}: dtype {buf.dtype} is not supported")
        host = buf if buf.device.type == "cpu" else buf.detach().cpu()
        nbytes = tensor_nbytes(buf)
        header = pack("t", src=self.rank, dst=dst, tag=tag, dtype=dtype, nbytes=nbytes)
        payload = memoryview(host_bytes(host)) if nbytes else b""
        tracker = self._send_frames(dst, [header, payload], True, f"send tag {tag}")
        self.counters.add_sent(nbytes, len(header))
        return _SendWork(self, tracker, dst, tag)

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        self._check_point_to_point(buf, src, tag, "irecv")
        if buf.dtype not in DTYPE_NAMES:
            raise ValueError(f"{self.describe(src, 'irecv')}: dtype {buf.dtype} is not supported")
        work = _RecvWork(self, buf, src, tag)
        key = (src, tag)
        with self._lock:
            queued = self._unexpected.get(key)
            item = queued.popleft() if queued else None
            if item is None:
                if src in self._gone:
                    work.complete(PeerFailed(f"{self.describe(src, f'recv tag {tag}')}: peer {self._gone[src]}"))
                else:
                    self._posted[key].append(work)
                return work
        self._fill(work, *item)
        return work

    # ================================================================ objects
    def send_object(self, obj: Any, dst: int) -> None:
        self._check_peer(dst, "send_object")
        self._require("send_object")
        self._raise_if_broken(dst, "send_object")
        data = msgpack.packb(obj, use_bin_type=True)
        header = pack("o", src=self.rank, dst=dst, nbytes=len(data))
        self._send_frames(dst, [header, data], False, "send_object")
        self.counters.add_sent(0, len(header) + len(data))

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        self._check_peer(src, "recv_object")
        self._require("recv_object")
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                box = self._objects[src]
                item = box.popleft() if box else None
            if item is not None:
                break
            if src in self._gone or self._fatal is not None or self._closed:
                reason = self._fatal or self._gone.get(src) or "transport is closed"
                raise PeerFailed(f"{self.describe(src, 'recv_object')}: peer {reason}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"{self.describe(src, 'recv_object')}: no object after {limit:.1f} s")
            self._progress(min(remaining, 0.05))
        data, header_len = item
        self.counters.add_received(0, header_len + len(data))
        return unpack_object(data, src, self.describe)

    # ================================================================ lifecycle
    def _close(self) -> None:
        """Say goodbye to every peer and close the sockets (queued sends get 1 s to leave).

        The transport is already marked closed, so a thread draining or in the handshake stops at
        its next check; one draining right now finishes its poll (at most 50 ms) before the
        sockets go."""
        got_recv = self._recv_lock.acquire(timeout=5.0)
        try:
            with self._send_lock:
                for peer, dealer in self._dealers.items():
                    if peer not in self._gone and peer in self._acked:
                        try:
                            dealer.send(pack("bye", src=self.rank, dst=peer), flags=self._zmq.NOBLOCK)
                        except Exception:  # noqa: BLE001 - the peer may be gone already
                            pass
                for dealer in self._dealers.values():
                    try:
                        dealer.disable_monitor()
                    except Exception:  # noqa: BLE001
                        pass
                for sock in (*self._monitors.values(), *self._dealers.values()):
                    sock.close()
                if self._router is not None:
                    self._router.close()
        finally:
            if got_recv:
                self._recv_lock.release()
        if self._ctx is not None:
            if got_recv:
                self._ctx.term()
            else:
                logger.error("%s: a thread is stuck draining; leaving the context open", self.describe(op="close"))
        with self._lock:
            stranded = [w for q in self._posted.values() for w in q]
            self._posted.clear()
        for work in stranded:
            work.complete(TransportError(f"{work.describe()}: transport closed"))
