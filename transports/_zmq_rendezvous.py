"""Rendezvous of the zmq transport: how every rank learns every other rank's endpoint.

Rank 0 binds a ROUTER on ``bind_addr:master_port``. Every other rank connects a DEALER there and
sends ``reg`` (magic, protocol version, rank, world size, config_hash, its data endpoint). Rank 0
answers a bad registration with ``rdv_reject`` (the rank raises at once) and keeps waiting; once
every rank has registered it sends each one the ``table`` of endpoints and a random job id, which
the peer handshake then checks. Timeouts name the ranks that never registered.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from ._zmq_protocol import Rejected, decode, identity, identity_mismatch, pack
from .base import TransportError, TransportTimeout

if TYPE_CHECKING:
    from .zeromq import ZmqTransport

__all__ = ["rendezvous"]

logger = logging.getLogger("pcpp_runtime.transports.zeromq")


def rendezvous(t: ZmqTransport, ctx: Any, deadline: float) -> tuple[str, list[str]]:
    """Rank 0 collects every endpoint and sends the table; the others register and wait for it.

    Returns ``(job id, endpoint of every rank)``.
    """
    if t.rank == 0:
        return _master(t, ctx, deadline)
    return _worker(t, ctx, deadline)


def _master(t: ZmqTransport, ctx: Any, deadline: float) -> tuple[str, list[str]]:
    import zmq

    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 2000)
    address = f"tcp://{t.bind_addr}:{t.master_port}"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        sock.close(0)
        raise TransportError(f"{t.describe(op='rendezvous')}: cannot bind {address}: {exc}") from exc
    try:
        job = secrets.token_hex(8)
        endpoints: list[str | None] = [None] * t.world_size
        endpoints[0] = t.endpoint
        identities: dict[int, bytes] = {}
        rejections: list[str] = []
        while len(identities) < t.world_size - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
                missing = [r for r in range(1, t.world_size) if r not in identities]
                note = f"; rejected: {'; '.join(rejections)}" if rejections else ""
                raise TransportTimeout(
                    f"{t.describe(op='rendezvous')}: ranks {missing} did not register at {address} "
                    f"within {t.timeout_s:.1f} s{note}"
                )
            frames = sock.recv_multipart()
            ident, rest = frames[0], frames[1:]
            try:
                if len(rest) != 1:
                    raise Rejected(f"expected 1 frame, got {len(rest)}")
                reg = decode(rest[0], ("reg",))
                reason = _check_registration(t, reg, identities)
                if reason:
                    raise Rejected(reason)
            except Rejected as exc:
                rejections.append(str(exc))
                logger.warning("%s: rejected a registration: %s", t.describe(op="rendezvous"), exc)
                sock.send_multipart([ident, pack("rdv_reject", reason=str(exc))])
                continue
            identities[reg["rank"]] = ident
            endpoints[reg["rank"]] = reg["endpoint"]
        table = pack("table", job=job, endpoints=endpoints)
        for ident in identities.values():
            sock.send_multipart([ident, table])
        return job, [str(e) for e in endpoints]
    finally:
        sock.close()  # LINGER lets the tables go out in the background


def _check_registration(t: ZmqTransport, reg: dict[str, Any], identities: dict[int, bytes]) -> str:
    """Rank 0: why it refuses this registration, or ``""``."""
    mismatch = identity_mismatch(reg, t.world_size, t.config_hash, "rank 0's")
    if mismatch:
        return mismatch
    if not 1 <= reg["rank"] < t.world_size:
        return f"rank {reg['rank']} is not in [1, {t.world_size})"
    if reg["rank"] in identities:
        return f"rank {reg['rank']} registered twice"
    return ""


def _worker(t: ZmqTransport, ctx: Any, deadline: float) -> tuple[str, list[str]]:
    import zmq

    address = f"tcp://{t.master_addr}:{t.master_port}"
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        sock.send(pack("reg", rank=t.rank, endpoint=t.endpoint, **identity(t.world_size, t.config_hash)))
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1):
            raise TransportTimeout(
                f"{t.describe(0, 'rendezvous')}: no endpoint table from {address} after {t.timeout_s:.1f} s"
            )
        try:
            reply = decode(sock.recv(), ("table", "rdv_reject"), max_array=t.world_size)
        except Rejected as exc:
            raise TransportError(f"{t.describe(0, 'rendezvous')}: bad reply from {address}: {exc}") from None
        if reply["k"] == "rdv_reject":
            raise TransportError(f"{t.describe(0, 'rendezvous')}: rank 0 refused this rank: {reply['reason']}")
        endpoints = reply["endpoints"]
        if len(endpoints) != t.world_size or not all(isinstance(e, str) for e in endpoints):
            raise TransportError(f"{t.describe(0, 'rendezvous')}: malformed endpoint table {endpoints!r}")
        return reply["job"], list(endpoints)
    finally:
        sock.close()
