"""Where does a benchmark point's time go? py-spy over one worker and over the N workers.

    .venv/bin/python benchmarks/profile_point.py --latent 64 --world 2 --policy partial --out prof/
    .venv/bin/python benchmarks/profile_point.py --latent 128 --policy full --transport torch --out prof/

Runs the one-worker baseline and then the N-worker point of ``pcpp bench`` (the same worker
processes) under ``py-spy record --subprocesses --idle --threads --nonblocking``, and sorts the
main thread's samples inside the denoising loop into: waiting for peers (transport waits),
the engine's own work (slicing, context assembly, posting messages), convolution, attention,
group norm, linear layers, the scheduler and everything else (elementwise ops, Python). Writes
``OUT/profile.md`` (the table), the raw py-spy stacks and the workers' results.

Needs py-spy (``pip install py-spy``) and permission to ptrace the workers (root, or
``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CATEGORIES = (  # matched on the innermost frame that names one, walking outwards
    ("convolution", ("torch/nn/modules/conv.py",)),
    ("attention", ("attention_processor.py", "scaled_dot_product_attention")),
    ("group norm", ("torch/nn/modules/normalization.py", "group_norm")),
    ("linear", ("torch/nn/modules/linear.py",)),
    ("scheduler", ("scheduling_ddim.py",)),
)
WAIT = "waiting for peers"
ENGINE = "engine (halo/context copies, posting messages)"
OTHER = "other (elementwise ops, activations, Python)"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(:\d+)?\)$")


_OPS = (  # pcpp_runtime's layers: the operation on the frame's source line
    ("convolution", ("conv2d(",)),
    ("attention", ("scaled_dot_product_attention",)),
)
_NORM_FILE = "pcpp_runtime/layers/group_norm.py"  # strip group norm: statistics and normalization
_REPO = Path(__file__).resolve().parents[1]


def _source_line(path: str, line: int) -> str:
    """The text of ``path:line`` (py-spy shortens paths to the package part)."""
    roots = [_REPO] + [Path(p) for p in sys.path if p]
    for root in roots:
        candidate = root / path
        if candidate.is_file():
            lines = candidate.read_text(errors="replace").splitlines()
            return lines[line - 1] if 0 < line <= len(lines) else ""
    return ""


def classify(frames: list[str]) -> str:
    """Category of one sample. A transport wait anywhere in the stack is waiting; an innermost
    frame in pcpp_runtime (or a transport) is the engine's own work, unless its source line is a
    convolution or attention call, or it is the strip group norm; else the innermost frame that
    names a category (diffusers' and torch's modules)."""
    for frame in frames:
        match = _FRAME.match(frame)
        if match and "transports/" in match["file"] and "wait" in match["func"].lower():
            return WAIT
    leaf = _FRAME.match(frames[-1]) if frames else None
    if leaf and (leaf["file"].startswith("pcpp_runtime/") or leaf["file"].startswith("transports/")):
        if leaf["file"] == _NORM_FILE:
            return "group norm"
        line = re.search(r":(\d+)\)$", frames[-1])
        text = _source_line(leaf["file"], int(line.group(1))) if line else ""
        for name, needles in _OPS:
            if any(n in text for n in needles):
                return name
        return ENGINE
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return OTHER


def summarize(raw: Path) -> dict[str, dict[str, int]]:
    """{process label: {category: samples}} for main-thread samples inside the denoising loop."""
    table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        threads = [f for f in frames if f.startswith("thread (")]
        if not procs or not threads or "MainThread" not in threads[-1]:
            continue
        if not any(f.startswith("denoise (") and "bench/model.py" in f for f in frames):
            continue
        proc = procs[-1]
        match = re.search(r"process (\d+)", proc)
        role = "one worker" if "--role baseline" in proc else "rank"
        label = f"{role} (pid {match.group(1) if match else '?'})"
        inner = frames[frames.index(threads[-1]) + 1 :]
        table[label][classify(inner)] += int(count)
    return {k: dict(v) for k, v in table.items()}


def record(argv: list[str], raw: Path, rate: int, log: Path) -> None:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    command = [pyspy, "record", "--subprocesses", "--idle", "--threads", "--nonblocking", "-r", str(rate), "-f", "raw",
               "-o", str(raw), "--", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "a") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"py-spy run failed ({done.returncode}); see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--policy", default="partial")
    parser.add_argument("--portion", type=float, default=0.3)
    parser.add_argument("--transport", default="zmq")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--rate", type=int, default=50, help="samples per second (default 50)")
    parser.add_argument("--out", default="profile-out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"model": args.model, "latent": args.latent, "world": args.world, "policy": args.policy,
            "portion": args.portion, "transport": args.transport, "steps": args.steps, "warmup": args.warmup_steps,
            "seed": 0}
    worker = [sys.executable, "-m", "pcpp_runtime.bench.worker", "--spec", json.dumps(spec)]
    log = out / "log.txt"
    record(worker + ["--role", "baseline", "--out", str(out / "baseline")], out / "baseline.raw", args.rate, log)
    if args.transport == "mpi":
        launch = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(args.world)]
    else:
        launch = [sys.executable, "-m", "pcpp_runtime.bench.launcher", "--nproc", str(args.world), "--"]
    record(launch + worker + ["--role", "parallel", "--out", str(out / "parallel")], out / "parallel.raw", args.rate, log)

    base = json.loads((out / "baseline" / "result.json").read_text())
    par = json.loads((out / "parallel" / "result.json").read_text())
    tables = {**summarize(out / "baseline.raw"), **summarize(out / "parallel.raw")}
    names = [WAIT, ENGINE] + [c for c, _ in CATEGORIES] + [OTHER]
    label = f"{args.policy}({args.portion:g})" if args.policy == "partial" else args.policy
    lines = [
        f"# Profile: {args.model}, {args.latent}x{args.latent} latent, {args.world} workers, {label}, {args.transport}",
        "",
        f"py-spy, {args.rate} samples/s (non-blocking), main thread inside the denoising loop. One worker: "
        f"{base['seconds']:.2f} s; {args.world} workers: {max(r['seconds'] for r in par['ranks']):.2f} s (slowest rank); "
        "CPU seconds / wall seconds of each process (I/O threads included): "
        + ", ".join(f"rank {r['rank']} {r['cpu_seconds'] / r['seconds']:.2f}" for r in par["ranks"])
        + f", one worker {base['cpu_seconds'] / base['seconds']:.2f}.",
        "",
        "| category | " + " | ".join(tables) + " |",
        "| --- |" + " --- |" * len(tables),
    ]
    for name in names:
        cells = []
        for proc, counts in tables.items():
            total = sum(counts.values()) or 1
            wall = base["seconds"] if proc.startswith("one worker") else max(r["seconds"] for r in par["ranks"])
            share = counts.get(name, 0) / total
            cells.append(f"{100 * share:.1f}% ({share * wall:.2f} s)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
