"""End to end over real processes: tiny-sd over torch (gloo), mpi and zmq gives the same final
latent, bit for bit, as the same job over the in-process transport."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2e_worker import SIZE, SPEC, config_for

HERE = Path(__file__).resolve().parent
WORKER = HERE / "e2e_worker.py"
POLICIES = ("full", "partial")


@pytest.fixture(scope="module")
def local_reference(tiny_sd):
    """Final latents over the in-process transport, one torch thread (as the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            (world, policy): tiny_sd.on_ranks(world, config_for(policy), SPEC, *SIZE)[0][0]
            for world in (2, 4)
            for policy in POLICIES
        }
    finally:
        torch.set_num_threads(threads)


def launch(transport: str, world: int, out: Path, mpiexec: str | None) -> subprocess.CompletedProcess:
    worker = [sys.executable, str(WORKER), "--transport", transport, "--out", str(out), "--policies", ",".join(POLICIES)]
    if transport == "mpi":
        command = [mpiexec, "-n", str(world)] + worker
    else:
        command = [sys.executable, "-m", "pcpp_runtime.cli", "launch", "-n", str(world), "--timeout", "240", "--"] + worker
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("transport", ["torch", "mpi", "zmq"])
def test_process_transports_match_in_process_bit_for_bit(transport, world, tmp_path, local_reference, request):
    mpiexec = request.getfixturevalue("mpiexec") if transport == "mpi" else None
    result = launch(transport, world, tmp_path, mpiexec)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for policy in POLICIES:
        latents = torch.load(tmp_path / f"{policy}.pt", weights_only=True)
        assert torch.equal(latents, local_reference[(world, policy)]), f"{transport} {policy} on {world} ranks"
    # bytes counted by the transport = the engine's own accounting, per rank, whole job
    engine = [json.loads((tmp_path / f"{p}.json").read_text()) for p in POLICIES]
    counted = json.loads((tmp_path / "transport.json").read_text())
    for rank in range(world):
        received = sum(run[rank]["engine_received"] for run in engine)
        sent = sum(run[rank]["engine_sent"] for run in engine)
        # the transport also carried the stats gathered over its object path, which are not tensors
        assert counted[rank]["payload_received"] == received, f"rank {rank}"
        assert counted[rank]["payload_sent"] == sent, f"rank {rank}"
