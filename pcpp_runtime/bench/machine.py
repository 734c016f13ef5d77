"""Is the machine quiet enough to time on? Load, and CPU used by others.

Timings on a shared machine mean something only when nothing else runs. Before each timed point
the runner waits until the CPUs were busy less than ``max_busy`` cores over a short sample
(``/proc/stat``) and, if asked, the 1-minute load average is below ``max_load``.

The load average is recorded but not used by default: it is a one-minute moving average that
still counts the benchmark's own previous point for a minute after it ended, while the sample
sees what runs now. During each point :class:`CpuMeter` measures the CPU time the whole machine
spent minus what this process and its (reaped) children spent: the *foreign* CPU, in cores.
A point that ran next to foreign work is flagged (and can be run again).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Callable

__all__ = ["CpuMeter", "Quiet", "busy_cores", "loadavg", "wait_for_quiet"]

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return [float("nan")] * 3


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot (busy: user, nice, system, irq, softirq)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def busy_cores(seconds: float = 3.0) -> float:
    """Cores kept busy by everything on the machine over the next ``seconds``."""
    try:
        b0, _ = _busy_jiffies()
        start = time.monotonic()
        time.sleep(seconds)
        b1, _ = _busy_jiffies()
        return (b1 - b0) / _HZ / (time.monotonic() - start)
    except (OSError, ValueError):
        return float("nan")


def _own_cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class CpuMeter:
    """CPU time spent by others while a point ran (start, run, reap the children, stop)."""

    def __init__(self) -> None:
        self._busy0, _ = _busy_jiffies()
        self._own0 = _own_cpu()
        self._t0 = time.monotonic()
        self.load_before = loadavg()

    def stop(self) -> dict[str, float]:
        busy1, _ = _busy_jiffies()
        wall = max(1e-9, time.monotonic() - self._t0)
        total = (busy1 - self._busy0) / _HZ
        own = _own_cpu() - self._own0
        return {
            "wall_seconds": wall,
            "machine_cpu_cores": total / wall,
            "own_cpu_cores": own / wall,
            "foreign_cpu_cores": max(0.0, (total - own) / wall),
        }


@dataclasses.dataclass
class Quiet:
    """The state of the machine just before a timed run."""

    loadavg: list[float]
    busy_cores: float
    waited_seconds: float
    quiet: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def wait_for_quiet(
    *,
    max_busy: float = 0.3,
    max_load: float | None = None,
    max_wait_s: float = 1200.0,
    poll_s: float = 30.0,
    sample_s: float = 3.0,
    say: Callable[[str], None] | None = None,
) -> Quiet:
    """Wait (up to ``max_wait_s``) until the machine is quiet; returns its state either way."""
    start = time.monotonic()
    told = False
    while True:
        busy = busy_cores(sample_s)
        load = loadavg()
        quiet = busy < max_busy and (max_load is None or load[0] < max_load)
        waited = time.monotonic() - start
        if quiet or waited >= max_wait_s:
            return Quiet(load, busy, waited, quiet)
        if say is not None and not told:
            say(f"waiting for a quiet machine (load {load[0]:.2f}, {busy:.2f} cores busy); up to {max_wait_s:.0f} s")
            told = True
        time.sleep(poll_s)
