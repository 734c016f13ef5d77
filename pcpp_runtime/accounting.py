"""Byte and time accounting, per rank, per step, per layer kind.

The engine records every message it posts here, attributed to the step whose compute uses it
(a displaced message posted during step t serves step t+1). The transport counts the same bytes
independently (:class:`pcpp_runtime.transports.ByteCounters`); tests check that the two agree.
"""

from __future__ import annotations

import collections
import dataclasses

__all__ = ["KINDS", "ByteLedger", "peak_rss_bytes"]

#: Layer kinds bytes are split by.
KINDS = ("attention_kv", "halo", "norm", "output")


@dataclasses.dataclass
class ByteLedger:
    """Bytes one rank sent and received, keyed by (step served, kind)."""

    received: dict[int, collections.Counter] = dataclasses.field(default_factory=dict)
    sent: dict[int, collections.Counter] = dataclasses.field(default_factory=dict)

    def add_received(self, step: int, kind: str, nbytes: int) -> None:
        self.received.setdefault(step, collections.Counter())[kind] += nbytes

    def add_sent(self, step: int, kind: str, nbytes: int) -> None:
        self.sent.setdefault(step, collections.Counter())[kind] += nbytes

    def clear(self) -> None:
        self.received.clear()
        self.sent.clear()

    def total(self, which: str = "received") -> int:
        table = self.received if which == "received" else self.sent
        return sum(sum(c.values()) for c in table.values())

    def per_step_mean(self, steps: range, which: str = "received") -> dict[str, float]:
        """Mean bytes per step over ``steps``, by kind, plus ``total``."""
        table = self.received if which == "received" else self.sent
        out = {kind: 0.0 for kind in KINDS}
        if len(steps) == 0:
            out["total"] = 0.0
            return out
        for step in steps:
            for kind, nbytes in table.get(step, {}).items():
                out[kind] = out.get(kind, 0.0) + nbytes
        out = {kind: value / len(steps) for kind, value in out.items()}
        out["total"] = sum(out[k] for k in out)
        return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (0 where the platform does not say)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0
