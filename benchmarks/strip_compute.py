"""Compute of one strip without any exchange: the ceiling on patch-parallel speed-up here.

    .venv/bin/python benchmarks/strip_compute.py [--sizes 64,128] [--strips 1,2,4] [--repeats 5]

One process, one thread: the stock benchmark UNet (no wrapper, zero padding at the strip's
edges) on a latent of ``H/N`` rows and the full width, median of ``--repeats`` forward passes
after two warm-up passes. ``ideal speed-up`` = t(H) / t(H/N): what N workers could reach if
exchanges, waits and the engine's own work cost nothing. Also the forward on an 8x8 latent,
which approximates the part of a step that does not shrink with the strip (time embedding,
Python and operator dispatch of ~1,000 small operations).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--sizes", default="64,128")
    parser.add_argument("--strips", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from pcpp_runtime.bench.model import build_unet, make_inputs

    unet = build_unet(args.model)

    def forward_seconds(rows: int, cols: int) -> float:
        inputs = make_inputs(args.model, max(rows, cols))
        latents = inputs.latents[:, :, :rows, :cols].contiguous()
        times = []
        with torch.no_grad():
            for i in range(args.repeats + 2):
                start = time.perf_counter()
                unet(latents, 500, encoder_hidden_states=inputs.encoder_hidden_states,
                     added_cond_kwargs=inputs.added_cond_kwargs, return_dict=False)
                if i >= 2:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)

    small = forward_seconds(8, 8)
    print(f"{args.model} UNet, one thread; 8x8 latent (fixed per-step cost): {small * 1e3:.1f} ms\n")
    print("| latent | strips | strip rows | forward (s) | ideal speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for size in (int(s) for s in args.sizes.split(",")):
        full = None
        for n in (int(s) for s in args.strips.split(",")):
            seconds = forward_seconds(size // n, size)
            full = full or seconds
            print(f"| {size}x{size} | {n} | {size // n} | {seconds:.3f} | {full / seconds:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
