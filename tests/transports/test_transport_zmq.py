"""ZeroMQ-specific behaviour: strict header validation, the handshake, port ranges."""

from __future__ import annotations

import pickle
import threading

import msgpack
import pytest
import torch
from pcpp_runtime.transports import TransportError, TransportTimeout
from pcpp_runtime.transports._zmq_protocol import PROTOCOL_VERSION, Rejected, decode
from pcpp_runtime.transports.zeromq import ZmqTransport
from transport_jobs import free_port, run_job

GOOD = {"v": PROTOCOL_VERSION, "k": "t", "src": 1, "dst": 0, "tag": 3, "dtype": "float32", "nbytes": 16}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "frame, reason",
    [
        (pickle.dumps(GOOD), "pickle"),
        (pickle.dumps(GOOD, protocol=2), "pickle"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "not valid msgpack"),
        (msgpack.packb("text"), "expected a map"),
        (msgpack.packb({**GOOD, "v": 2}), "protocol version"),
        (msgpack.packb({**GOOD, "k": "exec"}), "unexpected message kind"),
        (msgpack.packb({k: v for k, v in GOOD.items() if k != "tag"}), "has fields"),
        (msgpack.packb({**GOOD, "tag": True}), "expected int"),
        (msgpack.packb({**GOOD, "nbytes": "16"}), "expected int"),
        (msgpack.packb({**GOOD, "dtype": b"float32"}), "not valid msgpack"),  # bin is not allowed
        (b"\x80" * 5000, "too large"),
    ],
)
def test_header_validation_rejects(frame: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=reason):
        decode(frame, ("t", "o", "bye", "hello"))


def test_header_validation_accepts() -> None:
    assert decode(msgpack.packb(GOOD), ("t",)) == GOOD


def test_constructor_has_no_side_effects() -> None:
    port = free_port()
    before = threading.active_count()
    t = ZmqTransport(0, 2, 5.0, master_port=port, port_range=(40000, 40010), config_hash="x")
    assert threading.active_count() == before and t.endpoint is None
    t.close()  # closing an unconnected transport is fine, twice too
    t.close()
    with pytest.raises(ValueError, match="port_range"):
        ZmqTransport(0, 2, 5.0, port_range=(10, 5))


def _connect_all(transports: list[ZmqTransport]) -> list[BaseException]:
    errors: list[BaseException] = []

    def go(t: ZmqTransport) -> None:
        try:
            t.connect()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(t,)) for t in transports]
    for th in threads:
        th.start()
    for th in threads:
        th.join(20)
    return errors


@pytest.mark.timeout(30)
def test_port_range_and_timeouts_in_process() -> None:
    """Two ranks as threads: data ports inside the given range; waits honour their timeouts."""
    import time

    lo = free_port()
    port = free_port()
    ts = [ZmqTransport(r, 2, 5.0, master_port=port, port_range=(lo, lo + 50), config_hash="c") for r in range(2)]
    try:
        assert not _connect_all(ts)
        for t in ts:
            assert lo <= int(t.endpoint.rsplit(":", 1)[1]) <= lo + 50
        start = time.monotonic()
        with pytest.raises(TransportTimeout, match=r"zmq transport, rank 0/2, recv tag 9 with peer rank 1"):
            ts[0].irecv(torch.empty(3), 1, 9).wait(0.3)
        assert time.monotonic() - start < 1.0
        with pytest.raises(TransportTimeout, match="recv_object with peer rank 0"):
            ts[1].recv_object(0, timeout=0.2)
        x = torch.arange(5.0)
        w = ts[0].isend(x, 1, 9)  # the late message still matches a new receive
        y = torch.empty(5)
        ts[1].irecv(y, 0, 9).wait(5)
        w.wait(5)
        assert torch.equal(x, y)
        ts[1].close()
        with pytest.raises(TransportError, match="peer rank 1"):
            ts[0].irecv(torch.empty(3), 1, 10).wait(3)
    finally:
        for t in ts:
            t.close()


@pytest.mark.timeout(40)
def test_pickles_and_malformed_headers_are_rejected() -> None:
    """Pickled and malformed frames from a peer and from a stray socket are rejected with clear
    reasons; the receiving rank keeps working (see ``scenario_zmq_security``)."""
    job = run_job("zmq", 2, "zmq_security", timeout_s=10.0, job_timeout=30.0)
    assert job.ok, job.report()
    result = job.results[0]["result"]
    rejected = "\n".join(result["rejected"])
    for phrase in (
        "rejected a message from rank 1: header frame is a Python pickle",
        "header frame is not valid msgpack",
        "header announces 16 payload bytes",
        "protocol version 99",
        "expected ['dst', 'dtype', 'k', 'nbytes', 'src', 'tag', 'v']",
        "header says src 0",
        "unknown dtype 'object'",
        "rejected a message from an unknown sender: header frame is a Python pickle",
        "has not completed the handshake",
        "handshake refused: config_hash 'other-job'",
    ):
        assert phrase in rejected, f"{phrase!r} not in\n{rejected}"
    assert "does not fit receive buffer" in result["recv_error"]


@pytest.mark.timeout(40)
def test_mismatched_config_hash_refuses_to_connect() -> None:
    job = run_job("zmq", 2, "config_mismatch", timeout_s=3.0, job_timeout=30.0)
    assert not job.ok
    r1, r0 = job.results[1], job.results[0]
    assert r1["error_type"] == "TransportError" and "config_hash 'job-config-b' does not match" in r1["error"], (
        job.report()
    )
    assert r1["elapsed"] < 2.0, job.report()
    assert r0["error_type"] == "TransportTimeout" and "rejected: config_hash" in r0["error"], job.report()
