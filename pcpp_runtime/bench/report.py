"""Write a benchmark's results: JSON, CSV, a Markdown report with the targets, PNG plots.

Plots need matplotlib (``pip install 'pcpp-runtime[bench]'``); without it everything else is
written and the report says how to get the plots.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..accounting import KINDS
from ..files import write_atomically, write_json, write_text
from .targets import evaluate_targets, find_records

__all__ = ["markdown", "write_outputs"]

MB = 1e6

CSV_FIELDS = (
    "key", "kind", "model", "latent", "world_size", "policy", "portion", "label", "transport", "link", "steps",
    "warmup_steps", "seconds", "baseline_seconds", "speedup", "psnr_db", "max_abs_diff", "received_mb_mean",
    "received_mb_max", "kv_mb", "halo_mb", "norm_mb", "output_mb", "bytes_agree", "formula_agrees",
    "stale_buffer_mb_max", "peak_rss_mb_max", "baseline_peak_rss_mb", "load1_before", "busy_cores_before",
    "foreign_cpu_cores", "contended", "attempt",
)


def _mb(value: float | None) -> float | None:
    return None if value is None else value / MB


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    kinds = record.get("received_by_kind_mean", {})
    before = record.get("machine_before", {})
    foreign = [p.get("foreign_cpu_cores", 0.0) for p in (record.get("machine_during"), record.get("baseline_machine_during")) if p]
    return {
        **{k: record.get(k) for k in CSV_FIELDS if k in record},
        "received_mb_mean": _mb(record.get("received_per_step_mean", 0.0)),
        "received_mb_max": _mb(record.get("received_per_step_max", 0.0)),
        "kv_mb": _mb(kinds.get("attention_kv", 0.0)),
        "halo_mb": _mb(kinds.get("halo", 0.0)),
        "norm_mb": _mb(kinds.get("norm", 0.0)),
        "output_mb": _mb(kinds.get("output", 0.0)),
        "stale_buffer_mb_max": _mb(max(record.get("stale_buffer_bytes") or [0])),
        "peak_rss_mb_max": _mb(max(record.get("peak_rss_bytes") or [0])),
        "baseline_peak_rss_mb": _mb(record.get("baseline_peak_rss_bytes")),
        "load1_before": (before.get("loadavg") or [None])[0],
        "busy_cores_before": before.get("busy_cores"),
        "foreign_cpu_cores": max(foreign) if foreign else None,
    }


# ---------------------------------------------------------------------- markdown
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def _point_table(records: list[dict[str, Any]], throttled: bool = False) -> list[str]:
    head = ["latent", "workers", "policy", "transport"] + (["link"] if throttled else []) + [
        "time (s)", "one worker (s)", "speed-up", "PSNR (dB)", "MB/step received (KV / halo / norm / out)",
        "stale buf. MB", "peak RSS MB (1 worker)", "load1", "others' CPU (cores)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        flat = _flat(r)
        if r.get("kind") == "world1":
            received = "-"
            psnr = "identical" if r.get("identical") else "differs"
        else:
            received = (f"{flat['received_mb_mean']:.2f} ({flat['kv_mb']:.2f} / {flat['halo_mb']:.2f} / "
                        f"{flat['norm_mb']:.3f} / {flat['output_mb']:.3f})")
            if flat["received_mb_max"] - flat["received_mb_mean"] > 0.005:
                received += f", max {flat['received_mb_max']:.2f}"
            psnr = "identical" if r.get("psnr_db") is None else _fmt(r["psnr_db"], 1)
        rss = _fmt(flat["peak_rss_mb_max"], 0)
        if flat.get("baseline_peak_rss_mb"):
            rss += f" ({flat['baseline_peak_rss_mb']:.0f})"
        cells = [f"{r['latent']}x{r['latent']}", str(r["world_size"]), r["label"], r["transport"]]
        if throttled:
            cells.append(r["link"])
        flag = " (!)" if r.get("contended") else ""
        speed = _fmt(r["speedup"]) + "x"
        runs = r.get("runs") or []
        if len(runs) > 1:
            ratios = [run["baseline_seconds"] / run["seconds"] for run in runs]
            speed += f" ({min(ratios):.2f}-{max(ratios):.2f}, {len(runs)} runs)"
        cells += [
            _fmt(r["seconds"]), _fmt(r["baseline_seconds"]), speed + flag, psnr, received,
            _fmt(flat["stale_buffer_mb_max"]), rss, _fmt(flat["load1_before"]), _fmt(flat["foreign_cpu_cores"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _binding(mode: str | None) -> str:
    if mode == "cores":
        return "N workers: each bound to its share of the CPUs with its threads (`--cpu-bind cores`). "
    if mode == "none":
        return "N workers: placed by the kernel (`--cpu-bind none`). "
    return ""  # results written before the option existed


def markdown(results: dict[str, Any], plots: list[str] | None = None) -> str:
    meta = results["meta"]
    m = meta.get("machine", {})
    lines = [
        f"# pcpp bench: {meta['model']} ({meta.get('model_description', '')})",
        "",
        f"Command: `{meta.get('command') or 'pcpp bench'}`  ",
        f"Started {meta.get('started')}, finished {meta.get('finished')}; {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"torch {m.get('torch')}, diffusers {m.get('diffusers')}, commit {m.get('git_head', '?')}.  ",
        f"DDIM, {meta['steps']} steps ({meta['warmup_steps']} warm-up), batch 1 without guidance, float32, seed {meta['seed']}, "
        "one thread per worker. Time: the denoising loop on the slowest rank. One worker: the stock UNet in a fresh "
        f"process, run {'before every point' if meta.get('baseline') == 'per-point' else 'once per latent size'}. "
        f"{_binding(meta.get('cpu_bind'))}"
        "Bytes: received per rank per step after warm-up, mean over ranks (max when ranks differ). PSNR: final latent "
        "against the one worker's. load1: 1-minute load average before the point; others' CPU: cores used by other "
        "processes during the point ((!) marks a point measured next to other work).",
        "",
        "## Grid",
        "",
        *_point_table(results.get("points", [])),
        "",
    ]
    if results.get("throttled"):
        lines += ["## Throttled link (two network namespaces, veth pair, tc tbf)", "", *_point_table(results["throttled"], True), ""]
    elif results.get("throttled_skipped"):
        lines += ["## Throttled link", "", f"Skipped: {results['throttled_skipped']}.", ""]
    checks = results.get("cost_model_check") or []
    if checks:
        lines += [
            "## Cost model against the throttled runs",
            "",
            "| latent | policy | transport | link | calibrated on | C_sync / C_disp (s) | predicted (s) | measured (s) | error | predicted / measured speed-up |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in checks:
            lines.append(
                f"| {c['latent']}x{c['latent']} | {c['label']} | {c['transport']} | {c['link']} | {c['calibrated_on']} | "
                f"{c['c_sync']:.3f} / {c['c_disp']:.3f} | {c['predicted_seconds']:.2f} | {c['measured_seconds']:.2f} | "
                f"{c['error_pct']:+.1f}% | {c['predicted_speedup']:.2f}x / {c['measured_speedup']:.2f}x |"
            )
        lines.append("")
    lines += ["## Targets", ""]
    if results.get("targets"):
        lines += [f"From `{meta.get('targets_file')}`.", "", "| target | measured | holds |", "| --- | --- | --- |"]
        for t in results["targets"]:
            ok = {True: "yes", False: "**no**", None: "not measured"}[t["ok"]]
            lines.append(f"| {t['description']} | {t['measured']} | {ok} |")
    else:
        lines.append("No targets file (`pcpp bench --targets FILE`).")
    lines.append("")
    failures = results.get("failures") or []
    if failures:
        lines += ["## Failed points", ""] + [f"- `{f['key']}`: {f['error'].splitlines()[0]}" for f in failures] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    elif results.get("plots_skipped"):
        lines += ["## Plots", "", results["plots_skipped"], ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots
def _decorate(ax) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save_figure(plt, fig, out: Path, name: str) -> str:
    """Lay out, save as ``out/name`` and close ``fig``; returns ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _plots(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    points = [r for r in results.get("points", [])]
    parallel = [r for r in points if r.get("kind") == "parallel"]
    latents = sorted({r["latent"] for r in points})
    if parallel:
        fig, axes = plt.subplots(1, len(latents), figsize=(5 * len(latents), 4), squeeze=False)
        for ax, latent in zip(axes[0], latents):
            world1 = [r for r in points if r["latent"] == latent and r.get("kind") == "world1"]
            series = sorted({(r["label"], r["transport"]) for r in parallel if r["latent"] == latent})
            worlds_all = sorted({r["world_size"] for r in points if r["latent"] == latent} | {1})
            ax.plot(worlds_all, worlds_all, ":", color="grey", label="ideal")
            for label, transport in series:
                rs = sorted(find_records(parallel, latent=latent, label=label, transport=transport), key=lambda r: r["world_size"])
                xs = [1] + [r["world_size"] for r in rs]
                ys = [world1[0]["speedup"] if world1 else 1.0] + [r["speedup"] for r in rs]
                ax.plot(xs, ys, "o-", label=f"{label} ({transport})")
            ax.set_title(f"{latent}x{latent} latent")
            ax.set_xlabel("workers")
            ax.set_ylabel("speed-up over one worker")
            ax.set_xticks(worlds_all)
            _decorate(ax)
        written.append(_save_figure(plt, fig, out, "speedup_vs_world.png"))

        groups = sorted({(r["latent"], r["world_size"], r["label"]) for r in parallel}, key=lambda g: (g[0], g[1], g[2]))
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(groups)), 4.2))
        bottoms = [0.0] * len(groups)
        for kind in KINDS:
            values = []
            for latent, world, label in groups:
                rs = find_records(parallel, latent=latent, world_size=world, label=label)
                values.append(rs[0]["received_by_kind_mean"][kind] / MB)
            ax.bar(range(len(groups)), values, bottom=bottoms, label=kind)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{l}² n={w}\n{p}" for l, w, p in groups], fontsize=6, rotation=90)
        ax.set_ylabel("MB received per rank per step (mean)")
        ax.set_title("bytes per step after warm-up, by layer kind")
        ax.legend(fontsize=7)
        written.append(_save_figure(plt, fig, out, "bytes_by_kind.png"))

        fig, ax = plt.subplots(figsize=(6, 4.2))
        cap = max([r["psnr_db"] for r in parallel if r["psnr_db"] is not None] + [60.0]) + 10
        for label in sorted({r["label"] for r in parallel}):
            rs = [r for r in parallel if r["label"] == label]
            ax.scatter([r["received_per_step_mean"] / MB for r in rs], [cap if r["psnr_db"] is None else r["psnr_db"] for r in rs],
                       label=label)
            for r in rs:
                ax.annotate(f"{r['latent']}² n={r['world_size']}", (r["received_per_step_mean"] / MB,
                            cap if r["psnr_db"] is None else r["psnr_db"]), fontsize=6)
        ax.axhline(cap, color="grey", lw=0.5, ls=":")
        ax.set_xlabel("MB received per rank per step (mean)")
        ax.set_ylabel(f"PSNR vs one worker (dB; {cap:.0f} = identical)")
        ax.set_xscale("log")
        _decorate(ax)
        written.append(_save_figure(plt, fig, out, "psnr_vs_bytes.png"))

    throttled = [r for r in results.get("throttled", []) if r.get("kind") == "parallel"]
    if throttled:
        links = []
        for r in throttled:
            if r["link"] not in links:
                links.append(r["link"])
        lat = sorted({r["latent"] for r in throttled})
        fig, axes = plt.subplots(1, len(lat), figsize=(5 * len(lat), 4), squeeze=False)
        for ax, latent in zip(axes[0], lat):
            for label, transport in sorted({(r["label"], r["transport"]) for r in throttled if r["latent"] == latent}):
                xs, ys = [], []
                for i, link in enumerate(links):
                    rs = find_records(throttled, latent=latent, label=label, transport=transport, link=link)
                    if rs:
                        xs.append(i)
                        ys.append(rs[0]["speedup"])
                ax.plot(xs, ys, "o-", label=f"{label} ({transport})")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_xticks(range(len(links)))
            ax.set_xticklabels(links)
            ax.set_title(f"2 workers, one per namespace, {latent}x{latent}")
            ax.set_ylabel("speed-up over one worker")
            _decorate(ax)
        written.append(_save_figure(plt, fig, out, "throttled.png"))
    return written


# ---------------------------------------------------------------------- all files
def write_outputs(
    results: dict[str, Any],
    out: Path,
    *,
    targets: list[dict[str, Any]] | None = None,
    plots: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Check ``targets`` (:mod:`.targets`; ``None``: none) and write ``results.json``,
    ``results.csv``, ``results.md`` and the plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results, targets) if targets else []
    if results.get("throttled"):
        try:
            from .costmodel import check_throttled

            results["cost_model_check"] = check_throttled(results)
        except Exception as exc:  # noqa: BLE001 - the report is still written
            results["cost_model_check_error"] = f"{type(exc).__name__}: {exc}"
    written: list[str] = []
    if plots:
        try:
            written = _plots(results, out)
        except ImportError:
            results["plots_skipped"] = (
                "Plots need matplotlib: `pip install 'pcpp-runtime[bench]'` (or `pip install matplotlib`), then "
                "`pcpp bench --replot OUT` redraws them from results.json."
            )
            say(results["plots_skipped"])
    results["plots"] = written
    write_json(out / "results.json", results, indent=1)
    rows = [_flat(r) for r in results.get("points", []) + results.get("throttled", [])]

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)

    write_atomically(out / "results.csv", write_csv)
    write_text(out / "results.md", markdown(results, written) + "\n")
    say(f"wrote {out}/results.json, results.csv, results.md" + (f" and {', '.join(written)}" if written else ""))
    return results

