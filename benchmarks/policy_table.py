"""The README's policy table: tiny-sd on N in-process ranks, every policy, against one worker.

    .venv/bin/python benchmarks/policy_table.py [--steps 20] [--worlds 2,3,4]

Prints a Markdown table: PSNR of the final latent against one worker (same seed), bytes each
rank receives per step after warm-up (mean over ranks; attention KV share in brackets) and
the denoising time. Ranks are threads of one process here, so the time column shows the cost
of the exchanges, not a speed-up (see `pcpp bench` for processes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

from engine_helpers import on_ranks, one_worker  # noqa: E402
from pcpp_runtime import ParallelConfig  # noqa: E402
from pcpp_runtime.jobs import JobSpec  # noqa: E402
from pcpp_runtime.metrics import psnr  # noqa: E402
from pcpp_runtime.pipelines import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--worlds", default="2,3,4")
    parser.add_argument("--size", type=int, default=64, help="pixels, square")
    args = parser.parse_args()
    path = resolve_model("tiny-sd")
    spec = JobSpec(steps=args.steps, seed=0)
    start = time.perf_counter()
    reference = one_worker(path, spec, args.size, args.size)
    one_time = time.perf_counter() - start
    print(f"tiny-sd, {args.size}x{args.size} px, {args.steps} DDIM steps, {args.warmup_steps} warm-up, guidance 5.0, seed 0;"
          f" one worker {one_time:.2f} s\n")
    print("| world size | policy | PSNR vs one worker (dB) | received per step, MB (KV) | time (s) |")
    print("| --- | --- | --- | --- | --- |")
    policies = [("sync", 0.3), ("full", 0.3), ("partial", 0.3), ("partial", 0.1), ("none", 0.3)]
    for world in (int(w) for w in args.worlds.split(",")):
        for policy, portion in policies:
            config = ParallelConfig(policy=policy, portion=portion, warmup_steps=args.warmup_steps)
            start = time.perf_counter()
            latents, wrapped = on_ranks(path, world, config, spec, args.size, args.size)
            seconds = time.perf_counter() - start
            after = range(args.warmup_steps, args.steps)
            means = [w.runtime.ledger.per_step_mean(after) for w in wrapped]
            total = sum(m["total"] for m in means) / world / 1e6
            kv = sum(m["attention_kv"] for m in means) / world / 1e6
            value = psnr(latents[0], reference)
            label = f"partial({portion})" if policy == "partial" else policy
            print(f"| {world} | {label} | {value:.2f} | {total:.3f} ({kv:.3f}) | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
