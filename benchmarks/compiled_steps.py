"""Eager against compiled displaced steps: the step time of the benchmark model's strip forward.

    .venv/bin/python benchmarks/compiled_steps.py [--latent 64] [--world 2] [--policy partial] [--backend inductor]

Runs ``--world`` ranks as threads of this process over the in-process transport, one torch
thread each, on the benchmark model (``pcpp_runtime/bench/model.py``, DDIM, 20 steps, 4 warm-up):
one eager generation, then two with ``ParallelConfig(compile=...)`` -- the first pays for the
compilation at its first displaced step, the second replays the compiled graph. Prints the median
time of rank 0's displaced steps for each, and the compile time apart (the first compiled
generation's first displaced step, less a steady compiled step). Threads share the cores, so the
times compare eager with compiled; they are not a speed-up over one worker.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def _generation(model: str, latent: int, world: int, config, unets: list) -> list[list[float]]:
    """Each rank's step times of one generation."""
    import torch

    from pcpp_runtime import parallelize
    from pcpp_runtime.bench.model import denoise, make_inputs, make_scheduler
    from pcpp_runtime.threads import run_in_threads

    inputs = make_inputs(model, latent)
    steps = 20

    def rank(transport):
        torch.set_num_threads(1)
        wrapped = parallelize(unets[transport.rank], transport, config, num_steps=steps)
        times: list[float] = []
        try:
            denoise(wrapped, make_scheduler(steps), inputs, on_step=lambda i, seconds: times.append(seconds))
        finally:
            wrapped.remove()
        return times

    return run_in_threads(world, rank, 3600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--policy", default="partial")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from pcpp_runtime import ParallelConfig
    from pcpp_runtime.bench.model import build_unet

    unets = [build_unet(args.model) for _ in range(args.world)]
    eager_config = ParallelConfig(policy=args.policy, warmup_steps=4, timeout_s=3600)
    compiled_config = ParallelConfig(policy=args.policy, warmup_steps=4, timeout_s=3600,
                                     compile=True if args.backend == "inductor" else args.backend)
    displaced = slice(4, None)
    eager = _generation(args.model, args.latent, args.world, eager_config, unets)[0]
    started = time.perf_counter()
    first = _generation(args.model, args.latent, args.world, compiled_config, unets)[0]
    first_seconds = time.perf_counter() - started
    steady = _generation(args.model, args.latent, args.world, compiled_config, unets)[0]
    eager_step = statistics.median(eager[displaced])
    compiled_step = statistics.median(steady[displaced])
    compile_seconds = first[4] - compiled_step
    result = {
        "model": args.model, "latent": args.latent, "world_size": args.world, "policy": args.policy,
        "backend": args.backend, "torch": torch.__version__,
        "eager_displaced_step_ms": 1e3 * eager_step, "compiled_displaced_step_ms": 1e3 * compiled_step,
        "eager_sync_step_ms": 1e3 * statistics.median(eager[1:4]), "compile_seconds": compile_seconds,
        "first_compiled_generation_seconds": first_seconds,
    }
    print(f"{args.model} model, {args.latent}x{args.latent} latent, {args.world} ranks as threads, {args.policy}, "
          f"torch {torch.__version__}, backend {args.backend}; rank 0, medians of the 16 displaced steps:")
    print(f"  eager:    {result['eager_displaced_step_ms']:.1f} ms per displaced step "
          f"({result['eager_sync_step_ms']:.1f} ms per synchronous step)")
    print(f"  compiled: {result['compiled_displaced_step_ms']:.1f} ms per displaced step "
          f"({eager_step / compiled_step:.2f}x eager); compiling took {compile_seconds:.0f} s, once per rank and shape")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
