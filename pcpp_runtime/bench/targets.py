"""Targets a benchmark run is checked against, read from a data file.

The project's own targets live in ``docs/benchmarks/targets.json`` (``pcpp bench --targets FILE``
reads another); this module only knows how to check each *kind* of target against a run's
records. A target is a dict with an ``id``, a ``kind``, a ``description`` and the fields its kind
reads:

* ``bytes``: the point at ``latent``, ``world_size``, ``label`` receives at most ``max_mb`` MB
  per rank per step after warm-up (``statistic``: ``max`` over ranks or their ``mean``);
* ``speedup``: the 2-worker point at ``latent``, ``label`` is at least ``min_speedup`` times
  one worker on every process transport measured;
* ``world1``: at world size 1 the wrapped model is within ``max_overhead_pct`` % of stock;
* ``stale_memory``: at ``world_size``, the stale-context buffers of ``label`` are at most
  ``max_ratio`` of ``against``'s on the worst rank;
* ``throttled``: on the throttled ``link`` at ``latent``, ``label`` is at least
  ``min_speedup`` over one worker and at least ``min_gain`` faster than ``against``.

A target whose points the run did not measure is reported as not measured (``ok`` is ``None``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["default_data_file", "evaluate_targets", "find_records", "load_targets"]

MB = 1e6

Row = dict[str, Any]


def default_data_file(name: str) -> Path | None:
    """``docs/benchmarks/NAME`` of the checkout this package runs from, ``None`` elsewhere (an
    installed wheel has no docs)."""
    candidate = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / name
    return candidate if candidate.is_file() else None


def load_targets(path: str | Path) -> list[dict[str, Any]]:
    """The targets of a targets file (``{"targets": [...]}``); ``ValueError`` naming the file and
    the entry when one is malformed."""
    try:
        data = json.loads(Path(path).read_text())
        targets = list(data["targets"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"targets file {path}: cannot read its targets ({type(exc).__name__}: {exc})") from None
    for target in targets:
        if not isinstance(target, dict) or target.get("kind") not in _CHECKS or "id" not in target:
            raise ValueError(f"targets file {path}: {target!r} needs an id and a kind of {', '.join(_CHECKS)}")
    return targets


def find_records(records: list[Row], **want: Any) -> list[Row]:
    return [r for r in records if all(r.get(k) == v for k, v in want.items())]


def evaluate_targets(results: dict[str, Any], targets: list[dict[str, Any]]) -> list[Row]:
    """One row per target: ``target`` (its id), ``description``, ``ok`` (``None``: not measured
    in this run) and ``measured`` (the figures, as text)."""
    rows = []
    for target in targets:
        ok, measured = _CHECKS[target["kind"]](target, results)
        rows.append({"target": target["id"], "description": target.get("description", target["id"]), "ok": ok,
                     "measured": measured})
    return rows


def _bytes(target: dict[str, Any], results: dict[str, Any]) -> tuple[bool | None, str]:
    found = find_records(results.get("points", []), latent=target["latent"], world_size=target["world_size"],
                         label=target["label"])
    if not found:
        return None, "not measured"
    key = "received_per_step_max" if target["statistic"] == "max" else "received_per_step_mean"
    worst = max(r[key] for r in found) / MB
    detail = ", ".join(f"{r['transport']}: mean {r['received_per_step_mean'] / MB:.2f}, max {r['received_per_step_max'] / MB:.2f} MB"
                       for r in found)
    return worst <= target["max_mb"], detail


def _speedup(target: dict[str, Any], results: dict[str, Any]) -> tuple[bool | None, str]:
    found = [r for r in find_records(results.get("points", []), latent=target["latent"], world_size=2, label=target["label"])
             if r["transport"] in ("zmq", "torch", "mpi")]
    if not found:
        return None, "not measured"
    detail = "; ".join(
        f"{r['transport']}: {r['speedup']:.2f}x ({r['seconds']:.2f} s vs {r['baseline_seconds']:.2f} s"
        f"{', contended' if r.get('contended') else ''})" for r in found
    )
    return all(r["speedup"] >= target["min_speedup"] for r in found), detail


def _world1(target: dict[str, Any], results: dict[str, Any]) -> tuple[bool | None, str]:
    found = [r for r in results.get("points", []) if r.get("kind") == "world1"]
    if not found:
        return None, "not measured"
    detail = "; ".join(
        f"{r['latent']}x{r['latent']}: stock {r['baseline_seconds']:.2f} s, wrapped {r['seconds']:.2f} s "
        f"({r['overhead_pct']:+.2f}%; medians of {len(r['stock_seconds_runs'])} runs each), identical={r['identical']}"
        for r in found
    )
    return all(abs(r["overhead_pct"]) <= target["max_overhead_pct"] for r in found), detail


def _stale_memory(target: dict[str, Any], results: dict[str, Any]) -> tuple[bool | None, str]:
    points = results.get("points", [])
    pairs = []
    for latent in sorted({r["latent"] for r in points}):
        for transport in sorted({r["transport"] for r in points}):
            mine = find_records(points, latent=latent, world_size=target["world_size"], label=target["label"], transport=transport)
            other = find_records(points, latent=latent, world_size=target["world_size"], label=target["against"], transport=transport)
            if mine and other:
                ratios = [p / f for p, f in zip(mine[0]["stale_buffer_bytes"], other[0]["stale_buffer_bytes"]) if f]
                pairs.append((latent, transport, max(ratios), mine[0], other[0]))
    if not pairs:
        return None, "not measured"
    detail = "; ".join(
        f"{latent}x{latent} {transport}: worst rank {100 * ratio:.1f}% "
        f"({max(p['stale_buffer_bytes']) / MB:.2f} MB vs {max(f['stale_buffer_bytes']) / MB:.2f} MB)"
        for latent, transport, ratio, p, f in pairs
    )
    return all(ratio <= target["max_ratio"] for _, _, ratio, _, _ in pairs), detail


def _throttled(target: dict[str, Any], results: dict[str, Any]) -> tuple[bool | None, str]:
    throttled = results.get("throttled", [])
    checks = []
    for transport in sorted({r["transport"] for r in throttled}):
        where = dict(latent=target["latent"], link=target["link"], transport=transport)
        mine = find_records(throttled, label=target["label"], **where)
        other = find_records(throttled, label=target["against"], **where)
        if mine and other:
            p, f = mine[0], other[0]
            gain = f["seconds"] / p["seconds"] - 1.0
            checks.append((p["speedup"] >= target["min_speedup"] and gain >= target["min_gain"],
                           f"{transport}: {target['label']} {p['speedup']:.2f}x ({p['seconds']:.1f} s), {target['against']} "
                           f"{f['speedup']:.2f}x ({f['seconds']:.1f} s): {target['label']} {100 * gain:+.1f}% faster"))
    if not checks:
        reason = results.get("throttled_skipped")
        return None, f"not measured ({reason})" if reason else "not measured"
    return all(ok for ok, _ in checks), "; ".join(text for _, text in checks)


_CHECKS: dict[str, Callable[[dict[str, Any], dict[str, Any]], tuple[bool | None, str]]] = {
    "bytes": _bytes,
    "speedup": _speedup,
    "world1": _world1,
    "stale_memory": _stale_memory,
    "throttled": _throttled,
}
