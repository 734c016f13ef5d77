"""Where a rank's step goes besides compute: time in the engine's transport calls, per step and kind.

    .venv/bin/python benchmarks/exchange_times.py --latent 64 --policy partial
    .venv/bin/python benchmarks/exchange_times.py --latent 128 --policy full --transport mpi

Runs the N-worker point of ``pcpp bench`` once, as ``rank_diagnostics.py`` does (same worker,
same launch, ranks bound to cores unless ``--cpu-bind none``), with the engine's calls into the
transport timed on every rank (:class:`~pcpp_runtime.runtime.RankRuntime` methods, wrapped in the
worker process only). Prints, per rank, one row per kind and one column per step, in ms:

* ``gather:<kind>`` -- blocking all-gathers: ``norm`` (group-norm statistics) and
  ``attention_kv`` at synchronous steps, ``output`` at the end of every step;
* ``wait:<what>`` -- blocking waits inside the layers (fresh halo rows at synchronous steps);
* ``stale:wait`` -- before a step, the wait for its stale context and for the previous step's sends;
* ``post_send`` / ``post_recv`` -- posting the synchronous steps' messages; ``stale:post`` --
  posting the next step's context between layers; ``stale:post_end`` -- what is left of it after
  the forward (and, on a generation's first call, allocating the buffers).
  The column after the last step is the end of the generation (its posted messages drained).

A blocking call's time is this rank's wait for the slower one plus the message's transit, so the
sum over both ranks of one kind is what that kind of exchange costs the pair. For ``zmq`` it also
prints percentiles (10/50/90/99/100 %, in us) of the transport's own send and receive paths.
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rank_diagnostics

_MARK = "@@exchange-times"
_ENGINE_CALLS = {  # (class, method) -> how to name a call from its arguments
    ("RankRuntime", "wait"): lambda args: "wait:" + args[1].split(" in ")[0],
    ("RankRuntime", "all_gather"): lambda args: "gather:" + args[2],
    ("RankRuntime", "post_send"): lambda args: "post_send",
    ("RankRuntime", "post_recv"): lambda args: "post_recv",
    ("StaleContext", "before_step"): lambda args: "stale:wait",
    ("StaleContext", "after_layer"): lambda args: "stale:post",
    ("StaleContext", "after_step"): lambda args: "stale:post_end",
}
_ZMQ_CALLS = ("isend", "_send_frames", "irecv", "_drain_router", "_fill")


def _install_timers() -> None:
    """Wrap the engine's transport calls (and zmq's internals) in this worker process; print the
    totals when it exits."""
    import atexit

    from pcpp_runtime.context import StaleContext
    from pcpp_runtime.runtime import RankRuntime
    from pcpp_runtime.transports import zeromq

    classes = {"RankRuntime": RankRuntime, "StaleContext": StaleContext}

    per_step: dict[tuple[str, int], float] = collections.defaultdict(float)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    seen = {"rank": None}

    def engine_timer(cls, name, label):
        original = getattr(cls, name)

        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            step = getattr(self, "step", getattr(self, "_step", -1))  # before_step's is its first argument
            step = args[0] if name == "before_step" else step
            try:
                return original(self, *args, **kwargs)
            finally:
                per_step[(label(args), step)] += time.perf_counter() - start
                seen["rank"] = self.rank

        setattr(cls, name, timed)

    def zmq_timer(name):
        original = getattr(zeromq.ZmqTransport, name)

        def timed(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                durations[name].append(time.perf_counter() - start)

        setattr(zeromq.ZmqTransport, name, timed)

    for (cls, name), label in _ENGINE_CALLS.items():
        engine_timer(classes[cls], name, label)
    for name in _ZMQ_CALLS:
        zmq_timer(name)

    def report() -> None:
        rows: dict[str, dict[int, float]] = collections.defaultdict(dict)
        for (kind, step), seconds in per_step.items():
            rows[kind][step] = seconds
        percentiles = {}
        for name, values in durations.items():
            values.sort()
            percentiles[name] = [values[int(q * (len(values) - 1))] for q in (0.1, 0.5, 0.9, 0.99, 1.0)]
        print(f"{_MARK} {json.dumps({'rank': seen['rank'], 'rows': rows, 'percentiles': percentiles})}", flush=True)

    atexit.register(report)


def _print(records: list[dict]) -> None:
    for record in sorted(records, key=lambda r: r["rank"]):
        rows = record["rows"]
        steps = sorted({int(step) for per_step in rows.values() for step in per_step})
        print(f"\nrank {record['rank']}, ms per step")
        print(f"  {'step':34s} " + " ".join(f"{step:6d}" for step in steps))
        for kind, per_step in sorted(rows.items()):
            cells = (f"{1e3 * per_step[str(step)]:6.1f}" if str(step) in per_step else f"{'-':>6s}" for step in steps)
            print(f"  {kind:34s} " + " ".join(cells))
        for name, values in sorted(record["percentiles"].items()):
            print(f"  zmq {name:30s} " + " / ".join(f"{1e6 * v:.0f}" for v in values) + " us")


def main() -> int:
    collected: list[dict] = []

    def collect(stdout: str) -> None:
        for line in stdout.splitlines():
            if _MARK in line:
                collected.append(json.loads(line.split(_MARK, 1)[1]))

    code = rank_diagnostics.main(worker_script=__file__, on_output=collect)
    _print(collected)
    return code


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _install_timers()
        sys.exit(rank_diagnostics.worker(sys.argv[2:]))
    sys.exit(main())
