"""One conformance suite, every transport, world sizes 1, 2 and 4.

``local`` runs the checks in threads of this process; ``torch`` and ``zmq`` start one process per
rank; ``mpi`` runs ``mpiexec -n N``. A failing job reports every rank's traceback.
"""

from __future__ import annotations

import threading
import traceback

import pytest
from pcpp_runtime.transports import LocalFabric
from transport_conformance import run_conformance
from transport_jobs import run_job, skip_without_mpiexec

TRANSPORTS = ["local", "torch", "zmq", "mpi"]
WORLD_SIZES = [1, 2, 4]


def _run_local(world_size: int) -> None:
    fabric = LocalFabric(world_size)
    errors: dict[int, str] = {}

    def rank_main(rank: int) -> None:
        try:
            with fabric.transport(rank, timeout_s=30.0) as t:
                run_conformance(t)
        except BaseException:  # noqa: BLE001 - reported below
            errors[rank] = traceback.format_exc()
            fabric.abort(f"rank {rank} failed")

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a local rank hung"
    assert not errors, "\n".join(f"--- rank {r}\n{tb}" for r, tb in sorted(errors.items()))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_conformance(transport: str, world_size: int) -> None:
    if transport == "local":
        _run_local(world_size)
        return
    skip_without_mpiexec(transport)
    job = run_job(transport, world_size, "conformance", timeout_s=30.0, job_timeout=75.0)
    assert job.ok, job.report()
    assert sorted(job.results) == list(range(world_size)), job.report()
    assert all(res["ok"] for res in job.results.values()), job.report()


@pytest.mark.timeout(60)
def test_torch_batched_point_to_point() -> None:
    """NCCL's path (sends and receives queued, launched as one batch by the first wait) run on gloo."""
    job = run_job("torch", 2, "conformance_batched", timeout_s=30.0, job_timeout=50.0)
    assert job.ok, job.report()
