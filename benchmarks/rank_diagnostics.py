"""What each rank of one benchmark point does besides computing: threads, switches, waits.

    .venv/bin/python benchmarks/rank_diagnostics.py --latent 64 --policy partial
    .venv/bin/python benchmarks/rank_diagnostics.py --latent 128 --policy full --transport mpi

Runs the N-worker point of ``pcpp bench`` once (the same worker, launched the same way -- bound
to cores unless ``--cpu-bind none`` -- without the one-worker baseline) and prints, per rank:

* every thread's CPU seconds (user, system) and voluntary / involuntary context switches, read
  from ``/proc/self/task`` just before the transport closes (so the transport's own threads --
  libzmq's I/O thread, pyzmq's frame reaper -- are still there). Involuntary switches of the main
  thread are the times another thread or process took its core;
* the time each step spent in the output all-gather at the end of the step. At a displaced step
  nothing else blocks, so this is how long the rank waited for the slower one (plus the last
  messages' transit): the cost of two processes not running at the same speed;
* Python's garbage collections during the run (how many per generation, and their total time):
  a collection pauses one rank at a random moment, which the other rank then waits for;
* the step times, the messages received and the CPU seconds of the whole loop.

Linux only (``/proc``). Nothing here is used by ``pcpp bench``; it only wraps its worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

_MARK = "@@rank-diagnostics"


def _threads() -> list[dict]:
    """CPU seconds and context switches of every thread of this process."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    rows = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:  # the thread ended while we looked
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = dict(line.split(":") for line in status.splitlines() if "ctxt_switches" in line)
        rows.append({
            "thread": names.get(int(tid), comm),
            "user_s": int(fields[11]) / tick,
            "system_s": int(fields[12]) / tick,
            "voluntary": int(switches["voluntary_ctxt_switches"]),
            "involuntary": int(switches["nonvoluntary_ctxt_switches"]),
        })
    return rows


def worker(argv: list[str]) -> int:
    """The bench worker's parallel role, with the output gather timed and the threads read at close."""
    import pcpp_runtime.bench.worker as bench_worker
    import pcpp_runtime.connect as connect
    from pcpp_runtime.runtime import RankRuntime

    waits: list[float] = []
    gather = RankRuntime.all_gather

    def timed_gather(self, outputs, input, kind, where, transport=None):
        start = time.perf_counter()
        gather(self, outputs, input, kind, where, transport)
        if kind == "output":
            waits.append(time.perf_counter() - start)

    RankRuntime.all_gather = timed_gather
    import gc

    collections = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}  # generation -> [count, seconds]
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            entry = collections[info["generation"]]
            entry[0] += 1
            entry[1] += time.perf_counter() - started.pop()

    gc.callbacks.append(on_gc)
    open_transport = connect.open_transport

    def opened(*args, **kwargs):
        transport = open_transport(*args, **kwargs)
        close = transport.close

        def report_then_close() -> None:
            record = {"rank": transport.rank, "threads": _threads(), "output_gather_s": waits, "gc": collections}
            print(f"{_MARK} {json.dumps(record)}", flush=True)
            close()

        transport.close = report_then_close
        return transport

    connect.open_transport = opened
    return bench_worker.main(argv)


def main(worker_script: str = __file__, on_output: Callable[[str], None] | None = None) -> int:
    """Run the point with ``worker_script --worker ...`` on every rank (this file, or a script that
    wraps :func:`worker`) and print the report; ``on_output`` gets the workers' whole stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--policy", default="partial")
    parser.add_argument("--portion", type=float, default=0.3)
    parser.add_argument("--transport", default="zmq", choices=("zmq", "torch", "mpi"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--cpu-bind", choices=("cores", "none"), default="cores",
                        help="as pcpp bench: each rank on its share of the CPUs (default cores)")
    args = parser.parse_args()
    spec = {"model": "bench", "latent": args.latent, "world": args.world, "policy": args.policy,
            "portion": args.portion, "transport": args.transport, "steps": args.steps,
            "warmup": args.warmup_steps, "seed": 0, "timeout": 600.0}
    out = Path(tempfile.mkdtemp(prefix="rank-diagnostics-"))
    me = [sys.executable, worker_script, "--worker", "--role", "parallel", "--spec", json.dumps(spec), "--out", str(out)]
    if args.transport == "mpi":
        bind = ["-bind-to", "core"] if args.cpu_bind == "cores" else []
        launch = [str(Path(sys.executable).parent / "mpiexec"), *bind, "-n", str(args.world)]
    else:
        launch = [sys.executable, "-m", "pcpp_runtime.bench.launcher", "--nproc", str(args.world),
                  "--cpu-bind", args.cpu_bind, "--"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(launch + me, capture_output=True, text=True, env=env, timeout=1200)
    if on_output is not None:
        on_output(done.stdout)
    records = {}
    for line in done.stdout.splitlines():
        if _MARK in line:
            record = json.loads(line.split(_MARK, 1)[1])
            records[record["rank"]] = record
    if done.returncode != 0 or len(records) != args.world:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        return 1
    result = json.loads((out / "result.json").read_text())
    label = f"{args.policy}({args.portion:g})" if args.policy == "partial" else args.policy
    print(f"bench model, {args.latent}x{args.latent}, {args.world} workers, {label}, {args.transport}")
    for stats in result["ranks"]:
        rank = stats["rank"]
        steps = stats["step_seconds"]
        waits = records[rank]["output_gather_s"]
        print(f"\nrank {rank}: loop {stats['seconds']:.2f} s, CPU {stats['cpu_seconds']:.2f} s, "
              f"{stats['transport_messages_received']} messages received")
        print("  step ms:          " + " ".join(f"{1e3 * s:5.0f}" for s in steps))
        print("  output gather ms: " + " ".join(f"{1e3 * s:5.1f}" for s in waits))
        print(f"  output gather, displaced steps: {1e3 * sum(waits[args.warmup_steps:]):.0f} ms in all")
        gcs = records[rank]["gc"]
        print("  garbage collections (whole process): " + ", ".join(
            f"generation {g}: {n} in {1e3 * t:.1f} ms" for g, (n, t) in sorted(gcs.items())))
        print("  thread                      user s  system s  voluntary  involuntary")
        for row in records[rank]["threads"]:
            if row["user_s"] + row["system_s"] > 0 or row["voluntary"] > 10:
                print(f"  {row['thread'][:26]:26s} {row['user_s']:8.2f} {row['system_s']:9.2f} "
                      f"{row['voluntary']:10d} {row['involuntary']:12d}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(worker(sys.argv[2:]))
    sys.exit(main())
