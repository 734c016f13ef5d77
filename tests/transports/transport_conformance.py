"""The conformance checks every transport passes, written against the :class:`Transport` interface.

:func:`run_conformance` is called by every rank of a job (threads for ``local``, processes for the
others) and raises ``AssertionError`` on the first difference. It covers point-to-point messages
with several tags in flight and posted out of order (and messages that arrive before their receive
is posted), sizes from 0 bytes to 1 MiB plus one 64 MiB message, float32/float16/bfloat16/int64,
``all_gather`` with unequal shards, ``all_reduce`` (bit-identical on every rank), object messages,
``barrier``, and byte counters that agree with the payload sizes.

The ``scenario_*`` functions are the failure and security scenarios run by ``transport_worker.py``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pcpp_runtime.transports import Transport

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)
SIZES_BYTES = (0, 8, 4096, 1 << 20)
BIG_BYTES = 64 << 20


def pattern(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic values exact in every tested dtype (integers below 251)."""
    return ((torch.arange(numel, dtype=torch.int64) * 7 + seed) % 251).to(dtype)


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def _check_counters(
    t: Transport, before: dict[str, int], sent: int, received: int, n_sent: int, n_recv: int, what: str
) -> None:
    d = _delta(before, t.counters.snapshot())
    expected = {
        "payload_sent": sent,
        "payload_received": received,
        "messages_sent": n_sent,
        "messages_received": n_recv,
    }
    for key, value in expected.items():
        assert d[key] == value, f"{what}: {key} grew by {d[key]}, expected {value}"
    assert d["framing_sent"] >= 0 and d["framing_received"] >= 0


def check_p2p(t: Transport) -> None:
    """Every pair exchanges one message per (dtype, size) on its own tag, receives posted in
    reverse tag order, plus three messages on one tag (FIFO order)."""
    r, peers = t.rank, [p for p in range(t.world_size) if p != t.rank]
    specs = [(dtype, nbytes) for dtype in DTYPES for nbytes in SIZES_BYTES]
    before = t.counters.snapshot()
    recvs: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
    sends = []
    sent = received = 0
    for p in peers:
        for i in reversed(range(len(specs))):
            dtype, nbytes = specs[i]
            numel = nbytes // torch.empty((), dtype=dtype).element_size()
            buf = torch.full((numel,), 99, dtype=dtype)
            recvs.append((t.irecv(buf, p, 100 + i), buf, pattern(numel, dtype, p * 1000 + r * 100 + i)))
            received += nbytes
        for j in range(3):
            buf = torch.empty(16, dtype=torch.float32)
            recvs.append((t.irecv(buf, p, 7), buf, pattern(16, torch.float32, p * 1000 + r * 100 + 50 + j)))
            received += 64
    for p in peers:
        for i, (dtype, nbytes) in enumerate(specs):
            numel = nbytes // torch.empty((), dtype=dtype).element_size()
            data = pattern(numel, dtype, r * 1000 + p * 100 + i)
            sends.append((t.isend(data, p, 100 + i), data))
            sent += nbytes
        for j in range(3):
            data = pattern(16, torch.float32, r * 1000 + p * 100 + 50 + j)
            sends.append((t.isend(data, p, 7), data))
            sent += 64
    for work, buf, expected in reversed(recvs):  # wait out of posting order
        work.wait()
        assert work.is_completed()
        assert buf.dtype == expected.dtype and torch.equal(buf, expected), (
            f"rank {r}: wrong payload {buf[:8]} != {expected[:8]}"
        )
    for work, _ in sends:
        work.wait()
        assert work.is_completed()
    _check_counters(t, before, sent, received, len(sends), len(recvs), "p2p")


def check_unexpected(t: Transport) -> None:
    """Sends posted before the matching receives exist (the receiver waits in a barrier first)."""
    r, peers = t.rank, [p for p in range(t.world_size) if p != t.rank]
    sends = [(t.isend(pattern(1000, torch.bfloat16, r * 10 + p), p, 11), p) for p in peers]
    time.sleep(0.2)
    t.barrier()
    for p in peers:
        buf = torch.empty(1000, dtype=torch.bfloat16)
        t.irecv(buf, p, 11).wait()
        assert torch.equal(buf, pattern(1000, torch.bfloat16, p * 10 + r))
    for work, _ in sends:
        work.wait()


def check_big(t: Transport) -> None:
    """One 64 MiB float32 message from rank 0 to rank 1."""
    if t.world_size < 2 or t.rank > 1:
        return
    numel = BIG_BYTES // 4
    gen = torch.Generator().manual_seed(1234)
    before = t.counters.snapshot()
    if t.rank == 0:
        data = torch.randn(numel, generator=gen)
        t.isend(data, 1, 3).wait()
        _check_counters(t, before, BIG_BYTES, 0, 1, 0, "64 MiB send")
    else:
        buf = torch.empty(numel)
        t.irecv(buf, 0, 3).wait()
        assert torch.equal(buf, torch.randn(numel, generator=gen)), "64 MiB payload differs"
        _check_counters(t, before, 0, BIG_BYTES, 0, 1, "64 MiB recv")


def check_all_gather(t: Transport) -> None:
    n, r = t.world_size, t.rank
    for dtype, shape in ((torch.float32, lambda q: (5 * q + q % 2,)), (torch.bfloat16, lambda q: (q + 1, 3))):
        shapes = [shape(q) for q in range(n)]
        inputs = [pattern(torch.Size(s).numel(), dtype, 7 * q).reshape(s) for q, s in enumerate(shapes)]
        outputs = [torch.full(s, -1, dtype=dtype) for s in shapes]
        before = t.counters.snapshot()
        t.all_gather(outputs, inputs[r].clone())
        for q in range(n):
            assert torch.equal(outputs[q], inputs[q]), f"all_gather shard {q} differs on rank {r}"
        nb = [x.numel() * x.element_size() for x in inputs]
        _check_counters(t, before, (n - 1) * nb[r], sum(nb) - nb[r], n - 1, n - 1, "all_gather")


def check_all_reduce(t: Transport) -> None:
    n, r = t.world_size, t.rank
    buf = torch.full((17,), float(r + 1))
    t.all_reduce(buf, "sum")
    assert torch.equal(buf, torch.full((17,), n * (n + 1) / 2)), buf
    ibuf = torch.arange(5, dtype=torch.int64) * (r + 1)
    t.all_reduce(ibuf, "max")
    assert torch.equal(ibuf, torch.arange(5, dtype=torch.int64) * n)
    t.all_reduce(ibuf, "min")
    assert torch.equal(ibuf, torch.arange(5, dtype=torch.int64) * n)
    noisy = torch.randn(1000, generator=torch.Generator().manual_seed(r))
    t.all_reduce(noisy, "sum")
    results = [torch.empty_like(noisy) for _ in range(n)]
    t.all_gather(results, noisy)
    for q in range(n):
        assert torch.equal(results[q], noisy), f"all_reduce not bit-identical on ranks {r} and {q}"


def check_objects(t: Transport) -> None:
    n, r = t.world_size, t.rank
    before = t.counters.snapshot()
    for p in range(n):
        if p != r:
            t.send_object({"from": r, "to": p, "blob": bytes(range(r, r + 10)), "list": [1, 2.5, "x", None]}, p)
    for p in range(n):
        if p != r:
            got = t.recv_object(p)
            assert got == {"from": p, "to": r, "blob": bytes(range(p, p + 10)), "list": [1, 2.5, "x", None]}, got
    d = _delta(before, t.counters.snapshot())
    assert d["payload_sent"] == 0 and d["payload_received"] == 0, f"objects counted as payload: {d}"
    got = t.broadcast_object({"root": n - 1, "steps": list(range(20))}, root=n - 1)
    assert got == {"root": n - 1, "steps": list(range(20))}, got


def check_barrier(t: Transport) -> None:
    for _ in range(3):
        t.barrier()
    if t.world_size == 1:
        return
    if t.rank == 0:
        time.sleep(0.3)
    start = time.monotonic()
    t.barrier()
    if t.rank != 0:
        assert time.monotonic() - start > 0.2, "barrier returned before rank 0 entered it"


def check_errors(t: Transport) -> None:
    buf = torch.zeros(4)
    for bad in (t.rank, t.world_size, -1):
        try:
            t.isend(buf, bad, 0)
        except ValueError:
            pass
        else:
            raise AssertionError(f"isend to rank {bad} was accepted")
    try:
        t.isend(torch.zeros(4, 4).t(), (t.rank + 1) % max(t.world_size, 2), 0)
    except ValueError:
        pass
    else:
        raise AssertionError("a non-contiguous buffer was accepted")


def run_conformance(t: Transport, big: bool = True) -> dict[str, Any]:
    """Every check in order; returns timings per check. Call on every rank."""
    timings: dict[str, float] = {}
    checks = [
        check_errors,
        check_barrier,
        check_p2p,
        check_unexpected,
        check_all_gather,
        check_all_reduce,
        check_objects,
    ]
    if big:
        checks.append(check_big)
    checks.append(check_barrier)
    for check in checks:
        if t.world_size == 1 and check in (check_p2p, check_unexpected, check_errors):
            continue
        start = time.monotonic()
        check(t)
        timings[check.__name__] = round(time.monotonic() - start, 3)
    return {"timings": timings, "counters": t.counters.snapshot()}
