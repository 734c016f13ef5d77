"""Faults end jobs quickly with errors that name the transport, the peer rank and the operation.

Every job runs with a 5 s transport timeout and must end, launch included, in under 15 s.
"""

from __future__ import annotations

import pytest
from transport_jobs import JobResult, run_job, skip_without_mpiexec

PROCESS_TRANSPORTS = ["torch", "zmq", "mpi"]
LIMIT_S = 15.0


def _job(transport: str, scenario: str) -> JobResult:
    skip_without_mpiexec(transport)
    job = run_job(transport, 2, scenario, timeout_s=5.0, job_timeout=30.0)
    assert not job.timed_out, job.report()
    assert job.elapsed < LIMIT_S, f"took {job.elapsed:.1f} s\n{job.report()}"
    return job


def _assert_named_error(job: JobResult, rank: int, peer: int, op: str, transport: str, kinds: tuple[str, ...]) -> None:
    res = job.results.get(rank)
    assert res is not None and not res["ok"], job.report()
    assert res["error_type"] in kinds, job.report()
    message = res["error"]
    assert f"{transport} transport" in message and f"peer rank {peer}" in message and op in message, message
    waited = res["elapsed"] - res.get("connect_s", 0.0)
    assert waited < 5.0 + 2.5, f"rank {rank} needed {waited:.1f} s after connecting to fail"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_peer_never_sends(transport: str) -> None:
    """Both ranks wait for a message the other never sends: each raises after 5 s."""
    job = _job(transport, "never_sends")
    assert not job.ok
    # Each rank times out itself. The worker lingers 1 s after failing, so the peer's own timer
    # normally fires first; on a loaded machine the two timers can still be more than 1 s apart
    # and the later rank then sees the earlier one's connection close. Either error is named and
    # both must name the right peer and operation within the time limit, so both are accepted.
    kinds = ("TransportTimeout",) if transport == "mpi" else ("TransportTimeout", "PeerFailed")
    _assert_named_error(job, 0, 1, "recv tag 5", transport, kinds)
    _assert_named_error(job, 1, 0, "recv tag 6", transport, kinds)
    timeouts = [job.results[r]["error_type"] for r in (0, 1)].count("TransportTimeout")
    assert timeouts >= 1, job.report()  # somebody's own timer fired: nothing failed for another reason
    if transport == "mpi":
        assert job.returncodes[0] != 0, "mpiexec must exit non-zero when a rank raises"


@pytest.mark.timeout(40)
@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_peer_exits_mid_run(transport: str) -> None:
    """Rank 1 vanishes (``os._exit``) after a first exchange; rank 0 is waiting for it."""
    job = _job(transport, "exits")
    assert not job.ok
    if transport == "mpi":
        # mpiexec takes the whole job down; rank 0 never gets to raise
        assert job.returncodes[0] != 0, job.report()
        return
    _assert_named_error(job, 0, 1, "recv tag 2", transport, ("PeerFailed", "TransportTimeout"))


@pytest.mark.timeout(40)
@pytest.mark.parametrize("transport", PROCESS_TRANSPORTS)
def test_peer_leaves_early(transport: str) -> None:
    """Rank 1 closes its transport and exits 0 while rank 0 still waits for a message."""
    job = _job(transport, "exits_clean")
    assert not job.ok
    assert job.results[1]["ok"], job.report()
    kinds = ("TransportTimeout",) if transport == "mpi" else ("PeerFailed", "TransportTimeout")
    _assert_named_error(job, 0, 1, "recv tag 2", transport, kinds)
    if transport == "mpi":
        assert job.returncodes[0] != 0, job.report()


@pytest.mark.timeout(40)
def test_mpi_killed_rank_ends_job_nonzero() -> None:
    """SIGKILL on one rank under mpiexec ends the whole job with a non-zero code."""
    job = _job("mpi", "killed")
    assert job.returncodes[0] not in (0, None), job.report()
    assert 0 not in job.results or not job.results[0]["ok"], job.report()


_LONE_RANK = """
import sys, time
from pcpp_runtime.registry import transports
t = transports.get(sys.argv[1])(0, 2, 3.0, master_port=int(sys.argv[2]))
start = time.monotonic()
try:
    t.connect()
except Exception as exc:
    print(f"{type(exc).__name__}|{time.monotonic() - start:.2f}|{exc}")
"""


@pytest.mark.timeout(40)
@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_rank_missing_at_rendezvous(transport: str) -> None:
    """Rank 0 of a 2-rank job alone: connect raises TransportTimeout soon after its 3 s timeout."""
    import subprocess
    import sys

    from transport_jobs import free_port

    out = subprocess.run(
        [sys.executable, "-c", _LONE_RANK, transport, str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    kind, elapsed, message = out.stdout.strip().splitlines()[-1].split("|", 2)
    assert kind == "TransportTimeout", out.stdout + out.stderr
    assert f"{transport} transport, rank 0/2" in message, message
    assert float(elapsed) < 3.0 + 2.5, message
