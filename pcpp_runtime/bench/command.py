"""The ``pcpp bench`` and ``pcpp plan`` subcommands (argument parsing only at import time)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..launch.local import CPU_BIND_MODES

__all__ = ["add_parsers"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,2,4, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 1, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def _policies(text: str):
    from .runner import PolicySpec

    try:
        return [PolicySpec.parse(x) for x in _names(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_bench(sub)
    _add_plan(sub)


# ---------------------------------------------------------------------- bench
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark grid: policies x world sizes x latent sizes x transports, against one worker",
        description="Run the benchmark grid, each point in fresh worker processes next to one worker with the same "
        "seed, and write results.json, results.csv, results.md and PNG plots into --out, with the targets of --targets "
        "checked. Timings wait for a quiet machine (CPUs idle) and record the load.",
    )
    g = p.add_argument_group("grid")
    g.add_argument("--model", default="bench", choices=("bench", "tiny"),
                   help="bench (default): an SDXL-architecture UNet with narrow channels, 24.06 M parameters; tiny: the "
                   "same layout, narrower and shallower, for tests")
    g.add_argument("--policies", type=_policies, default=None,
                   help="comma-separated: sync, full, none, partial (p = 0.3), partial:P (default sync,full,partial:0.3,none)")
    g.add_argument("--worlds", type=_ints, default=[1, 2, 4], help="world sizes (default 1,2,4; 1 = stock vs wrapped)")
    g.add_argument("--sizes", type=_ints, default=None, help="square latent sizes (default: bench 64,128; tiny 32)")
    g.add_argument("--transports", type=_names, default=["zmq"], help="zmq, torch, mpi (default zmq)")
    g.add_argument("--steps", type=int, default=None, help="DDIM steps (default: bench 20, tiny 4)")
    g.add_argument("--warmup-steps", type=int, default=None, help="synchronous warm-up steps (default: bench 4, tiny 2)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--baseline", choices=("per-point", "shared"), default="per-point",
                   help="one worker before every point (default) or once per latent size")
    g.add_argument("--repeats", type=int, default=1,
                   help="runs of one worker and of the N workers per point, alternating; medians reported (default 1)")
    g.add_argument("--overhead-sizes", type=_ints, default=None, help="latent sizes of the world-size-1 point (default: the smallest)")
    g.add_argument("--overhead-repeats", type=int, default=3, help="stock/wrapped runs each at world size 1 (default 3)")
    g.add_argument("--cpu-bind", choices=CPU_BIND_MODES, default="cores",
                   help="cores (default): bind each of a point's workers and its threads to its share of the CPUs, "
                   "as mpirun --bind-to core does; none: let the kernel place them. One worker is never bound")
    g = p.add_argument_group("throttled link (root: two network namespaces joined by a veth pair, tc tbf)")
    g.add_argument("--throttle", type=_names, default=[],
                   help="rates to run 2 workers at, one per namespace, e.g. veth,1gbit,100mbit (veth: no limit)")
    g.add_argument("--throttle-transports", type=_names, default=None, help="default: --transports without mpi")
    g.add_argument("--throttle-policies", type=_policies, default=None, help="default: --policies")
    g.add_argument("--throttle-sizes", type=_ints, default=None, help="default: --sizes")
    g.add_argument("--throttled-only", action="store_true", help="run only the throttled-link points, not the grid")
    g = p.add_argument_group("quiet machine")
    g.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    g.add_argument("--max-busy", type=float, default=0.3, help="quiet: fewer cores busy than this over 3 s (default 0.3)")
    g.add_argument("--max-load", type=float, default=None, help="quiet: also a 1-minute load average below this")
    g.add_argument("--quiet-wait", type=float, default=1200.0, help="longest wait for quiet, seconds (default 1200)")
    g.add_argument("--foreign-limit", type=float, default=0.15,
                   help="flag a point when others used more cores than this during it (default 0.15)")
    g.add_argument("--retries", type=int, default=1, help="runs again of a flagged point (default 1)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    g.add_argument("--point-timeout", type=float, default=900.0, help="seconds one process may run (default 900)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-plots", action="store_true", help="no PNG plots")
    g.add_argument("--replot", metavar="DIR", default=None, help="only rewrite the tables and plots of DIR/results.json")
    default_targets = _default_file("targets.json")
    g.add_argument("--targets", metavar="FILE", default=default_targets,
                   help="targets to check the results against (JSON; default: docs/benchmarks/targets.json of this "
                   f"checkout{', here ' + default_targets if default_targets else ', not found here'})")
    g.add_argument("--no-targets", dest="targets", action="store_const", const=None, help="check no targets")
    p.set_defaults(func=_cmd_bench)


def _default_file(name: str) -> str | None:
    from .targets import default_data_file

    path = default_data_file(name)
    return None if path is None else str(path)


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .report import write_outputs
    from .runner import BenchOptions, PolicySpec, run_bench
    from .targets import load_targets

    try:
        targets = load_targets(args.targets) if args.targets else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.replot:
        folder = Path(args.replot)
        try:
            results = json.loads((folder / "results.json").read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--replot {folder}: cannot read results.json: {exc}")
        results.setdefault("meta", {})["targets_file"] = args.targets
        write_outputs(results, folder, targets=targets, plots=not args.no_plots)
        return 0
    if args.throttled_only and not args.throttle:
        parser.error("--throttled-only needs --throttle RATES")
    unknown = [t for t in args.transports + (args.throttle_transports or []) if t not in ("zmq", "torch", "mpi")]
    if unknown:
        parser.error(f"unknown transport(s) {', '.join(unknown)}: pcpp bench runs zmq, torch and mpi")
    policies = args.policies or [PolicySpec("sync"), PolicySpec("full"), PolicySpec("partial", 0.3), PolicySpec("none")]
    from pcpp_runtime.registry import policies as registered

    for spec in policies + (args.throttle_policies or []):
        if spec.name not in registered:
            parser.error(f"unknown policy {spec.name!r}; choose one of: {', '.join(registered.names())}")
        if not 0 < spec.portion <= 1:
            parser.error(f"portion of {spec.label} must be in (0, 1]")
    options = BenchOptions(
        out=args.out,
        model=args.model,
        policies=policies,
        worlds=args.worlds,
        sizes=args.sizes,
        transports=args.transports,
        steps=args.steps,
        warmup=args.warmup_steps,
        seed=args.seed,
        baseline=args.baseline,
        throttle=args.throttle,
        throttle_transports=args.throttle_transports,
        throttle_policies=args.throttle_policies,
        throttle_sizes=args.throttle_sizes,
        overhead_sizes=args.overhead_sizes,
        overhead_repeats=args.overhead_repeats,
        wait=not args.no_wait,
        max_busy=args.max_busy,
        max_load=args.max_load,
        quiet_wait=args.quiet_wait,
        foreign_limit=args.foreign_limit,
        retries=args.retries,
        repeats=args.repeats,
        point_timeout=args.point_timeout,
        cpu_bind=args.cpu_bind,
        progress=not args.no_progress,
        plots=not args.no_plots,
        skip_grid=args.throttled_only,
        targets=args.targets,
        command="pcpp " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
    )
    try:
        results = run_bench(options)
    except ValueError as exc:
        parser.error(str(exc))
    print()
    for target in results["targets"]:
        mark = {True: "holds", False: "MISSED", None: "not measured"}[target["ok"]]
        print(f"[{mark}] {target['description']}\n        {target['measured']}")
    return 1 if results["failures"] else 0


# ---------------------------------------------------------------------- plan
def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="cost model: predicted step time and speed-up for N workers over a link",
        description="Predict step time and speed-up from compute per strip and bytes per step over a link. "
        "Without --from: SDXL at 1024x1024 on N GPUs over NVLink and 100 Gbit/s Ethernet (bytes from the formulas on "
        "SDXL's UNet configuration, built on the meta device; compute per strip measured on one H100, see --compute). With "
        "--from: the model calibrated on a pcpp bench run, checked against its throttled points, and its predictions "
        "for --bandwidth.",
    )
    p.add_argument("--gpus", type=_ints, default=[4, 8], help="GPU counts (default 4,8)")
    p.add_argument("--links", type=_names, default=["nvlink4", "100gbe"],
                   help="nvlink (A100), nvlink4 (H100), 100gbe (default nvlink4,100gbe)")
    p.add_argument("--compute", default="h100",
                   help="compute per strip, a name in --strip-times: h100 (measured, CUDA graph: the GPU's own time; "
                   "default), h100-eager (measured, the engine in eager PyTorch), a100 (published one-GPU step / GPUs)")
    default_times = _default_file("gpu_strip_times.json")
    p.add_argument("--strip-times", metavar="FILE", default=default_times,
                   help="measured GPU strip times and published step times (JSON; default: "
                   "docs/benchmarks/gpu_strip_times.json of this checkout"
                   f"{', here ' + default_times if default_times else ', not found here'})")
    p.add_argument("--policies", type=_policies, default=None, help="default full,partial:0.3")
    p.add_argument("--step-time", type=float, default=None,
                   help="one-GPU UNet step (batch 2 with guidance) in seconds, divided by the GPUs (overrides --compute)")
    p.add_argument("--fixed-ms", type=float, default=0.0, help="per-step compute that does not shrink with the strip, ms")
    p.add_argument("--latent", type=int, default=128, help="latent size (default 128 = 1024x1024 pixels)")
    p.add_argument("--steps", type=int, default=50, help="steps (default 50, as the references)")
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--no-cfg-parallel", action="store_true", help="all GPUs split the guidance batch (default: two CFG groups)")
    p.add_argument("--from", dest="source", default=None, metavar="RESULTS", help="a pcpp bench results.json")
    p.add_argument("--bandwidth", type=_names, default=None, help="with --from: tc rates to predict, e.g. 100mbit,10mbit")
    p.add_argument("--json", default=None, help="also write the predictions here")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import costmodel

    policies = [(s.name, s.portion) for s in (args.policies or [])] or [("full", 0.3), ("partial", 0.3)]
    unknown = [link for link in args.links if link not in costmodel.LINKS]
    if unknown:
        parser.error(f"unknown link(s) {', '.join(unknown)}; choose from {', '.join(costmodel.LINKS)}")
    output: dict = {}
    cache: dict = {}
    if args.source:
        try:
            results = json.loads(Path(args.source).read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--from {args.source}: {exc}")
        output["throttled_check"] = checks = costmodel.check_throttled(results, cache)
        if checks:
            print("Cost model against the throttled runs (calibrated on the unthrottled run of the same point):")
            print(f"  {'point':34s} {'link':8s} {'predicted':>10s} {'measured':>10s} {'error':>7s}  speed-up pred./meas.")
            for c in checks:
                name = f"{c['latent']}² n={c['world_size']} {c['label']} {c['transport']}"
                print(f"  {name:34s} {c['link']:8s} {c['predicted_seconds']:9.2f}s {c['measured_seconds']:9.2f}s "
                      f"{c['error_pct']:+6.1f}%  {c['predicted_speedup']:.2f}x / {c['measured_speedup']:.2f}x")
        else:
            print(f"{args.source} has no throttled points to check the model against")
        if args.bandwidth:
            output["predictions"] = rows = []
            print("\nPredicted at other bandwidths (calibrated on the measured loopback and unthrottled veth points):")
            measured = results.get("points", []) + [r for r in results.get("throttled", []) if r["link"] == "veth"]
            for record in measured:
                if record.get("kind") != "parallel":
                    continue
                for rate in args.bandwidth:
                    pred = costmodel.predict_point(record, costmodel.tbf_link(rate), cache)
                    row = {"key": record["key"], "rate": rate, "seconds": pred["seconds"],
                           "speedup": record["baseline_seconds"] / pred["seconds"]}
                    rows.append(row)
                    print(f"  {record['latent']}² n={record['world_size']} {record['label']:13s} {record['transport']:5s} "
                          f"@{rate:8s} {pred['seconds']:7.2f} s  {row['speedup']:.2f}x")
        print()
    times = costmodel.GpuTimes()
    if args.strip_times:
        try:
            times = costmodel.GpuTimes.load(args.strip_times)
        except ValueError as exc:
            parser.error(str(exc))
    if args.step_time is None and args.compute not in times.names():
        known = ", ".join(times.names()) or f"none: no strip times file ({args.strip_times or 'give --strip-times FILE'})"
        parser.error(f"unknown --compute {args.compute!r}; choose from {known}, or give --step-time")
    try:
        rows = costmodel.predict_gpus(
            times,
            args.gpus, args.links, policies, compute=args.compute, step_time_s=args.step_time,
            fixed_s=args.fixed_ms / 1e3, latent=args.latent, steps=args.steps, warmup=args.warmup_steps,
            cfg_parallel=not args.no_cfg_parallel, cache=cache,
        )
    except ValueError as exc:
        parser.error(str(exc))
    output["gpus"] = rows
    print(f"SDXL UNet at {8 * args.latent}x{8 * args.latent} px, {args.steps} steps ({args.warmup_steps} warm-up), fp16, "
          f"guidance batch 2; {costmodel.gpu_compute_source(times, args.compute, args.step_time)}")
    print(f"  {'GPUs':4s} {'layout':22s} {'link':28s} {'policy':13s} {'MB/step':>8s} {'compute':>8s} {'transfer':>9s} "
          f"{'step':>8s} {'speed-up':>8s}")
    for r in rows:
        print(f"  {r['gpus']:<4d} {r['layout']:22s} {r['link']:28s} {r['policy']:13s} {r['received_per_step_max'] / 1e6:8.1f} "
              f"{r['compute_per_step'] * 1e3:6.1f}ms {r['transfer_per_step'] * 1e3:7.2f}ms {r['displaced_step'] * 1e3:6.1f}ms "
              f"{r['speedup']:7.2f}x")
    print("  (compute: displaced step's compute per strip; PCPP paper: 2.36-8.02x on 4-8 GPUs, DistriFusion 2.32-6.71x)")
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=1) + "\n")
    return 0
