"""CUDA buffers over every transport (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from transport_jobs import run_job, skip_without_mpiexec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["zmq", "mpi"])
def test_cuda_buffers_two_ranks_one_gpu(transport: str) -> None:
    """zmq stages through host memory; MPI uses CUDA-aware MPI or pinned staging buffers."""
    skip_without_mpiexec(transport)
    job = run_job(transport, 2, "gpu", timeout_s=60.0, job_timeout=100.0, device="cuda")
    assert job.ok, job.report()


@pytest.mark.timeout(120)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_nccl_two_gpus() -> None:
    job = run_job("torch", 2, "gpu", timeout_s=60.0, job_timeout=100.0, device="cuda")
    assert job.ok, job.report()
