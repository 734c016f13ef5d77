"""Launch anywhere, end to end: ``pcpp generate`` started by real launchers gives one worker's image.

Each job runs tiny-sd (4 steps, 32x32 px) on two processes under ``--policy sync`` (exact), with
``--compare --report r.json --output o.png``; the report's ``max_abs_diff`` (final latent against
one worker, same seed) must be at most 1e-4 and the PNG must equal the one that
``pcpp generate --nproc 1 --transport local`` writes within one gray level.

* ``mpiexec -n 2`` (MPICH's Hydra, from the ``mpich`` wheel) over ``--transport mpi``;
* ``torchrun --nproc-per-node 2`` over ``--transport torch`` (gloo): torchrun's ``MASTER_PORT`` is
  its own TCPStore, already listening, which the torch transport must join (a transport that bound
  it would fail with "address in use"); and over ``zmq``, which must move to another port;
* ``pcpp launch -n 2 --transport zmq --cpu-bind cores -- pcpp generate``, and
  ``pcpp generate --nproc 2 --transport zmq --cpu-bind cores`` (which starts its own workers).

The helpers (``run_job``, ``check_job``, ...) are ``launch_jobs.py``'s, shared with ``test_two_hosts.py``
and ``test_slurm.py``.
"""

from __future__ import annotations

import pytest

from launch_jobs import JOB_ARGS, JOB_TIMEOUT_S, PCPP, check_job, run_job, tail
from pcpp_runtime.launch import free_port

OUT = ["--compare", "--report", "r.json", "--output", "o.png", "--timeout", "60"]


@pytest.mark.timeout(200)
def test_mpiexec_mpi(mpiexec, tmp_path, one_worker_png, no_leftovers):
    done = run_job([mpiexec, "-n", "2", PCPP, "generate", "--transport", "mpi", *JOB_ARGS, *OUT], cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport="mpi", world_size=2)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("transport", ["torch", "zmq"])
def test_torchrun(transport, torchrun, tmp_path, one_worker_png, no_leftovers):
    port = free_port()
    done = run_job([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                    "--master-port", str(port), "--no-python",
                    PCPP, "generate", "--transport", transport, *JOB_ARGS, *OUT], cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport=transport, world_size=2)


@pytest.mark.timeout(200)
def test_generate_nproc_starts_its_own_bound_workers(tmp_path, one_worker_png, no_leftovers):
    # `pcpp generate --nproc 2 --transport zmq` starts two workers of itself (without --nproc and
    # --cpu-bind, which the workers would refuse under a launcher)
    done = run_job([PCPP, "generate", "--nproc", "2", "--transport", "zmq", "--cpu-bind", "cores", *JOB_ARGS, *OUT],
                   cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport="zmq", world_size=2)
    assert "[launcher] binding workers to CPUs: rank 0: CPU" in done.stdout


@pytest.mark.timeout(200)
def test_pcpp_launch_zmq(tmp_path, one_worker_png, no_leftovers):
    # no --transport for generate: `pcpp launch --transport zmq` sets PCPP_TRANSPORT, its default
    # --cpu-bind cores: each rank on its share of the CPUs (the launcher says which)
    done = run_job([PCPP, "launch", "-n", "2", "--transport", "zmq", "--timeout", str(JOB_TIMEOUT_S - 10),
                    "--cpu-bind", "cores", "--", PCPP, "generate", *JOB_ARGS, *OUT], cwd=tmp_path)
    assert done.returncode == 0, tail(tmp_path / "job.log")
    check_job(tmp_path, transport="zmq", world_size=2)
    assert "[rank 0]   report: r.json" in done.stdout  # rank 0's summary, under the launcher's prefix
    assert "[launcher] binding workers to CPUs: rank 0: CPU" in done.stdout
