"""Host work per denoiser call: the aten operators one rank dispatches, view and non-view apart.

    .venv/bin/python benchmarks/host_ops.py [--latent 32] [--json out/host_ops.json]

On a GPU every non-view operator is a kernel launched from Python, so the count bounds how fast
the host can drive a step whatever the GPU. Operators are counted with a ``TorchDispatchMode`` on
rank 0 of N ranks that run as threads over the in-process transport; the transport's own work is
not counted (on a process transport it is not aten operators, and NCCL's kernels are not the
engine's). The counts depend on the model, the shapes and the torch version, not on the machine.

Rows, on the benchmark model (``pcpp_runtime/bench/model.py``, SDXL layout, batch 1):

* ``stock UNet, one strip``: the unwrapped UNet called on rank 0's strip alone (the reference);
* ``synchronous step``: a step of the ``sync`` policy after the first (the first registers buffers);
* ``displaced step``: a steady displaced step of the policy (the second displaced step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench", help="benchmark model (default bench)")
    parser.add_argument("--latent", type=int, default=32, help="square latent size (default 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)

    from pcpp_runtime.bench.host_ops import count_job_ops

    cases = [(2, "partial", 0.3), (3, "partial", 0.3), (4, "full", 0.3)]
    rows = [count_job_ops(args.model, args.latent, world, policy, portion) for world, policy, portion in cases]
    print(_table(rows, args.model, args.latent))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _table(rows: list[dict[str, Any]], model: str, latent: int) -> str:
    import torch

    lines = [
        f"{model} model, {latent}x{latent} latent, batch 1, torch {torch.__version__}: aten operators per denoiser call "
        "on rank 0 (non-view / view)",
        "",
        "| ranks | policy | stock UNet, one strip | synchronous step | displaced step | sync / stock | displaced / stock |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        stock, sync, disp = r["stock"], r["sync"], r["displaced"]
        lines.append(
            f"| {r['world_size']} | {r['label']} | {stock['non_view']:,} / {stock['view']:,} | "
            f"{sync['non_view']:,} / {sync['view']:,} | {disp['non_view']:,} / {disp['view']:,} | "
            f"{sync['non_view'] / stock['non_view']:.2f}x | {disp['non_view'] / stock['non_view']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
