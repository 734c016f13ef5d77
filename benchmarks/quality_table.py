"""Quality against bytes on the trained `demo` model: PSNR and SSIM of every policy against one
worker, on fixed prompts, next to the bytes each rank receives per step (the PCPP paper's
trade-off curve, measured).

    .venv/bin/python benchmarks/quality_table.py [--prompts 50] [--worlds 2,4] [--out out/quality]

Prompts are the captions of shapes scenes drawn with seeds 1000, 1001, ... (one to three shapes),
each generated with seed = its index. Ranks are threads of one process over the `local`
transport (the same engine and bytes as over processes). Writes `quality.md` (the table:
mean over prompts, and the worst prompt), `quality.json` (every run) and `quality.png`
(PSNR against MB per step). Takes about an hour on 2 cores with the defaults (50 prompts: 56
minutes, 2026-11-29; 20 prompts: 24).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _policies(portions: list[float], warmup: int):
    from pcpp_runtime import ParallelConfig

    out = [("full", ParallelConfig(policy="full", warmup_steps=warmup))]
    out += [(f"partial({p:g})", ParallelConfig(policy="partial", portion=p, warmup_steps=warmup)) for p in portions]
    out.append(("none", ParallelConfig(policy="none", warmup_steps=warmup)))
    return out


def prompts(count: int) -> list[str]:
    import numpy as np

    from pcpp_runtime.models.demo_training.shapes import sample_scene

    return [sample_scene(np.random.default_rng(1000 + i)).caption for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--portions", default="0.1,0.2,0.3,0.5,1.0")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("out/quality"))
    args = parser.parse_args()
    import torch
    from tqdm.auto import tqdm

    from pcpp_runtime.grid import run_one_worker, run_policy
    from pcpp_runtime.jobs import JobSpec
    from pcpp_runtime.pipelines import default_size, load_pipelines

    torch.set_num_threads(1)
    worlds = [int(w) for w in args.worlds.split(",")]
    policies = _policies([float(p) for p in args.portions.split(",")], args.warmup_steps)
    texts = prompts(args.prompts)
    pipes = load_pipelines(args.model, max(worlds))
    height, width = default_size(pipes[0])
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.perf_counter()
    bar = tqdm(total=len(texts) * (1 + len(worlds) * len(policies)), desc="quality", unit="run", file=sys.stderr)
    for index, prompt in enumerate(texts):
        spec = JobSpec(model=args.model, prompt=prompt, steps=args.steps, seed=index)
        reference = run_one_worker(pipes[0], spec)
        bar.update()
        for world in worlds:
            for label, config in policies:
                run = run_policy(pipes, spec, world, config, label, reference)
                records.append({"prompt": prompt, "seed": index, **run.to_dict()})
                bar.update()
    bar.close()
    minutes = (time.perf_counter() - started) / 60
    (args.out / "quality.json").write_text(json.dumps({"model": args.model, "steps": args.steps,
                                                        "warmup_steps": args.warmup_steps, "size": [height, width],
                                                        "minutes": minutes, "runs": records}, indent=1) + "\n")
    table = _table(records, worlds, [label for label, _ in policies], args, height, width, minutes)
    (args.out / "quality.md").write_text(table)
    _plot(records, worlds, args.out / "quality.png")
    print(table)
    return 0


def _table(records, worlds, labels, args, height, width, minutes) -> str:
    lines = [
        f"`{args.model}`, {width}x{height} px, {args.steps} DDIM steps ({args.warmup_steps} warm-up), guidance 5.0, "
        f"{args.prompts} prompts (shapes scenes of seeds 1000..{999 + args.prompts}, generation seed = index); "
        f"image PSNR and SSIM against one worker, mean over prompts (worst prompt in brackets); "
        f"MB received per rank per step after warm-up, mean over ranks and prompts. {minutes:.0f} min.",
        "",
        "| workers | policy | MB/step | PSNR (dB) | SSIM |",
        "| --- | --- | --- | --- | --- |",
    ]
    for world in worlds:
        for label in labels:
            rows = [r for r in records if r["world_size"] == world and r["label"] == label]
            psnrs = [r["image_psnr_db"] if r["image_psnr_db"] is not None else 99.0 for r in rows]
            ssims = [r["ssim"] for r in rows]
            mb = statistics.mean(r["mb_received_per_step"] for r in rows)
            lines.append(f"| {world} | {label} | {mb:.3f} | {statistics.mean(psnrs):.2f} ({min(psnrs):.2f}) | "
                         f"{statistics.mean(ssims):.4f} ({min(ssims):.4f}) |")
    return "\n".join(lines) + "\n"


def _plot(records, worlds, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for world, marker in zip(worlds, "os^D"):
        labels = sorted({r["label"] for r in records if r["world_size"] == world},
                        key=lambda l: statistics.mean(r["mb_received_per_step"] for r in records if r["label"] == l))
        xs, ys = [], []
        for label in labels:
            rows = [r for r in records if r["world_size"] == world and r["label"] == label]
            xs.append(statistics.mean(r["mb_received_per_step"] for r in rows))
            ys.append(statistics.mean(r["image_psnr_db"] if r["image_psnr_db"] is not None else 99.0 for r in rows))
            ax.annotate(label, (xs[-1], ys[-1]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.plot(xs, ys, marker=marker, label=f"{world} workers")
    ax.set_xlabel("MB received per rank per step (after warm-up)")
    ax.set_ylabel("image PSNR against one worker (dB)")
    ax.set_title("demo model: quality against communication")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
