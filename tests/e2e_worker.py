"""One rank of an end-to-end test job: tiny-sd under several policies over a process transport.

Started once per rank by a launcher (``pcpp launch``, ``mpiexec``, ``torchrun``, ``srun``):

    python tests/e2e_worker.py --transport zmq --out DIR --policies sync,full,partial

Rank discovery and the transport are the ones ``pcpp generate`` uses. For each policy rank 0
saves the final latent (``DIR/<policy>.pt``, a local file written by this test job) and the
per-rank byte counts (``DIR/<policy>.json``). Torch runs one thread, as the reference does, so
the floating-point results can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import quiet_pipeline  # noqa: E402

from pcpp_runtime import ParallelConfig, parallelize  # noqa: E402
from pcpp_runtime.connect import open_transport  # noqa: E402
from pcpp_runtime.jobs import JobSpec  # noqa: E402
from pcpp_runtime.pipelines import call_pipeline, resolve_model  # noqa: E402
from pcpp_runtime.ranks import gather_to_rank0  # noqa: E402
from pcpp_runtime.launch import discover  # noqa: E402

SPEC = JobSpec(steps=6, guidance_scale=5.0, seed=5)
SIZE = (64, 48)


def config_for(policy: str) -> ParallelConfig:
    return ParallelConfig(policy=policy, portion=0.3, warmup_steps=2, timeout_s=60)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--policies", default="full,partial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = discover()
    pipe = quiet_pipeline(resolve_model("tiny-sd"))
    transport = open_transport(args.transport, info, 60.0, "e2e-test")
    try:
        for policy in args.policies.split(","):
            wrapped = parallelize(pipe, transport, config_for(policy))
            latents = call_pipeline(wrapped, SPEC, *SIZE)
            runtime = wrapped.runtime
            stats = {
                "engine_received": runtime.ledger.total("received"),
                "engine_sent": runtime.ledger.total("sent"),
            }
            wrapped.denoiser.remove()
            everyone = gather_to_rank0(transport, stats)
            if transport.rank == 0:
                torch.save(latents, Path(args.out) / f"{policy}.pt")
                (Path(args.out) / f"{policy}.json").write_text(json.dumps(everyone))
        counters = transport.counters.snapshot()
        everyone = gather_to_rank0(transport, {"payload_received": counters["payload_received"], "payload_sent": counters["payload_sent"]})
        if transport.rank == 0:
            (Path(args.out) / "transport.json").write_text(json.dumps(everyone))
    finally:
        transport.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
