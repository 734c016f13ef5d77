"""The ``pcpp`` command.

``pcpp generate`` runs one text-to-image job split over N workers. Only the standard library
is imported before a subcommand needs more, so ``pcpp --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

from .launch.local import CPU_BIND_MODES

__all__ = ["main"]

_POLICY_HELP = "conditioning policy: sync (exact), full (DistriFusion), partial (PCPP), none, or a plugin's name"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _port_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI such as 40000-40100, got {text!r}") from None
    return lo, hi


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 2,1,1, got {text!r}") from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate one image with the denoiser split over N workers",
        description="Generate one image with the denoiser split over N workers.",
    )
    g = p.add_argument_group("image")
    g.add_argument("--model", default="demo", help="built-in name (demo, the trained shapes model; tiny-sd, ...: see pcpp info), hub id or local diffusers folder (default demo)")
    g.add_argument("--prompt", default="a red circle at the top left and a blue square at the bottom")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--height", type=_positive_int, default=None, help="pixels (default: the model's)")
    g.add_argument("--width", type=_positive_int, default=None, help="pixels (default: the model's)")
    g.add_argument("--steps", type=_positive_int, default=20, help="denoising steps (default 20)")
    g.add_argument("--scheduler", default=None, help="ddim, euler, euler-a, dpm++, pndm, flow-euler or a class name")
    g.add_argument("--guidance-scale", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("parallelism")
    g.add_argument("--policy", default="partial", help=_POLICY_HELP + " (default partial)")
    g.add_argument("--portion", type=float, default=0.3, help="partial: fraction of each neighbour strip, (0, 1] (default 0.3)")
    g.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps first (default 4)")
    g.add_argument("--partitioner", default="rows", help="rows (default) or weighted")
    g.add_argument("--weights", type=_weights, default=None, help="relative capacity per rank, e.g. 2,1,1")
    g.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="send the unconditional and conditional halves of the guidance batch to two groups of ranks "
        "(even world size), each splitting its half into strips",
    )
    g.add_argument("--nproc", type=_positive_int, default=None, help="number of workers to start here")
    g.add_argument(
        "--cpu-bind",
        choices=CPU_BIND_MODES,
        default="none",
        help="with --nproc and a process transport: bind each worker to its share of the CPUs (default none)",
    )
    g.add_argument(
        "--transport",
        default=os.environ.get("PCPP_TRANSPORT", "local"),
        help="local (threads of one process), torch, mpi, zmq or a plugin (default: $PCPP_TRANSPORT or local)",
    )
    g.add_argument("--timeout", type=float, default=300.0, help="seconds any wait on a peer may take (default 300)")
    g = p.add_argument_group("rendezvous (override what the launcher's environment says)")
    g.add_argument("--rank", type=int, default=None)
    g.add_argument("--world-size", type=int, default=None)
    g.add_argument("--master-addr", default=None, help="host of rank 0")
    g.add_argument("--master-port", type=int, default=None)
    g.add_argument(
        "--bind-addr",
        default=None,
        help="zmq: interface to bind (0.0.0.0 across machines); torch: the interface gloo/NCCL use (this host's address)",
    )
    g.add_argument("--advertise-addr", default=None, help="zmq: the address peers use to reach this rank")
    g.add_argument("--port-range", type=_port_range, default=None, help="zmq: data ports LO-HI (firewalls)")
    g.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:<local rank> when CUDA is present)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, help="PNG to write (rank 0)")
    g.add_argument("--report", default=None, help="JSON report to write (rank 0)")
    g.add_argument("--compare", action="store_true", help="also run one worker with the same seed and report the difference")
    g.add_argument(
        "--grid",
        action="store_true",
        help="one picture of one worker, sync, full, partial(--portion) and none on --nproc ranks (default 2) "
        "in this process, each labelled with its PSNR against one worker and its bytes per step "
        "(written to --output, default out/grid.png)",
    )
    p.set_defaults(func=_cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcpp",
        description="pcpp-runtime: patch-parallel diffusion inference (DistriFusion and PCPP policies).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_launch(sub)
    _add_info(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args, parser) or 0)


# ---------------------------------------------------------------------- launch, info
def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="start N local workers of a command (torchrun-style)",
        description="Start N local workers of COMMAND with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
        "MASTER_PORT set; prefix their output with the rank; if one fails, stop the others and exit with its code.",
    )
    p.add_argument("-n", "--nproc", type=_positive_int, required=True, help="number of workers")
    p.add_argument("--transport", default=None, help="sets PCPP_TRANSPORT for the workers (pcpp generate's default)")
    p.add_argument("--timeout", type=float, default=None, help="stop every worker after this many seconds")
    p.add_argument(
        "--cpu-bind",
        choices=CPU_BIND_MODES,
        default="none",
        help="cores: bind each worker and its threads to its share of the CPUs (Linux; as mpirun --bind-to core)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=_cmd_launch)


def _cmd_launch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser.error("give the command to run after --, e.g. pcpp launch -n 2 -- pcpp generate")
    env = dict(os.environ)
    if args.transport:
        env["PCPP_TRANSPORT"] = args.transport
    return _run_workers(args.nproc, command, parser, env=env, timeout_s=args.timeout, cpu_bind=args.cpu_bind)


def _run_workers(n: int, command: list[str], parser: argparse.ArgumentParser, **kwargs: Any) -> int:
    """:func:`run_workers`; what it refuses before starting anything (``--cpu-bind cores`` off
    Linux) is a usage error."""
    from .launch import run_workers

    try:
        return run_workers(n, command, **kwargs)
    except ValueError as exc:
        parser.error(str(exc))


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="what is available here: transports, policies, partitioners, built-in models, devices")
    p.set_defaults(func=lambda args, parser: _print_info())


def _print_info() -> int:
    from .info import collect_info

    info = collect_info()
    print("transports:")
    for name, (ok, detail) in info["transports"].items():
        print(f"  {name:8s} {'yes' if ok else 'no ':3s}  {detail}")
    print(f"policies:     {', '.join(info['policies'])}")
    print(f"partitioners: {', '.join(info['partitioners'])}")
    print(f"models:       {', '.join(info['models'])}")
    print("devices:")
    for line in info["devices"]:
        print(f"  {line}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``pcpp bench`` and ``pcpp plan`` (pcpp_runtime.bench; argument parsing only, no torch)."""
    from .bench.command import add_parsers

    add_parsers(sub)


# ---------------------------------------------------------------------- generate
def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import ConfigError, ParallelConfig
    from .generate import JobSpec

    try:
        config = ParallelConfig(
            policy=args.policy,
            portion=args.portion,
            warmup_steps=args.warmup_steps,
            partitioner=args.partitioner,
            weights=args.weights,
            cfg_split=args.cfg_parallel,
            timeout_s=args.timeout,
        )
        spec = JobSpec(
            model=args.model,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            steps=args.steps,
            scheduler=args.scheduler,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
        )
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))
    relaunch = args.nproc is not None and "PCPP_LAUNCHER" not in os.environ and args.world_size is None
    if args.cpu_bind != "none" and (args.grid or args.transport == "local" or not relaunch):
        parser.error(
            "--cpu-bind places the worker processes --nproc starts with a process transport (zmq, torch, mpi); "
            "with threads (--transport local, --grid) or under another launcher it has nothing to bind "
            "(use mpirun --bind-to core, srun --cpu-bind=cores)"
        )
    if args.grid:
        return _generate_grid(args, spec, config, parser)
    if args.transport == "local":
        return _generate_local(args, spec, config, parser)
    from .registry import transports

    if args.transport not in transports:
        parser.error(f"unknown transport {args.transport!r}; choose one of: {', '.join(transports.names())}")
    if relaunch:
        return _relaunch(args, parser)
    return _generate_on_process(args, spec, config, parser)


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (every occurrence)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def _relaunch(args, parser: argparse.ArgumentParser) -> int:
    """``--nproc N`` with a process transport: start N workers of this same command."""
    argv = _without_option(_without_option(list(args.argv), "--nproc"), "--cpu-bind")
    command = [sys.executable, "-m", "pcpp_runtime.cli"] + argv + ["--transport", args.transport]
    return _run_workers(args.nproc, command, parser, timeout_s=None, cpu_bind=args.cpu_bind)


def _generate_on_process(args, spec, config, parser) -> int:
    """This process is one rank of a job a launcher (or ``--nproc``) started."""
    from .config import ConfigError
    from .connect import TransportSettings, open_transport
    from .generate import check_shape, default_size, gather_stats, load_pipeline, run_rank
    from .launch import LaunchEnvironmentError, discover
    from .transports.base import TransportError

    overrides = {
        "rank": args.rank,
        "world_size": args.world_size,
        "master_addr": args.master_addr,
        "master_port": args.master_port,
    }
    try:
        info = discover(overrides=overrides)
    except LaunchEnvironmentError as exc:
        parser.error(str(exc))
    if args.nproc is not None and args.nproc != info.world_size:
        parser.error(f"--nproc {args.nproc} disagrees with the launcher's world size {info.world_size}")
    _quiet_libraries()
    device = args.device or _default_device(info)
    settings = TransportSettings(args.bind_addr, args.advertise_addr, args.port_range, device if device != "cpu" else None)
    try:
        pipe = load_pipeline(spec.model, spec.scheduler, device=device)
        height, width = spec.height or default_size(pipe)[0], spec.width or default_size(pipe)[1]
        check_shape(pipe, height, width, info.world_size, config)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(str(exc))
    prefix = f"pcpp generate [rank {info.rank}/{info.world_size}, {args.transport}]"
    try:
        transport = open_transport(args.transport, info, config.timeout_s, config.fingerprint(), settings)
    except (TransportError, ValueError, ImportError) as exc:
        print(f"{prefix}: could not connect: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        latents, stats = run_rank(pipe, transport, spec, config)
        all_stats = gather_stats(transport, stats)
        if transport.rank == 0:
            baseline = _baseline(load_pipeline(spec.model, spec.scheduler, device=device), spec, height, width) if args.compare else None
            _finish(args, spec, config, pipe, latents, all_stats, baseline, height, width, transport=args.transport)
    except TransportError as exc:
        print(f"{prefix}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        transport.close()
    return 0


def _default_device(info) -> str:
    from .launch import select_device

    return str(select_device(info))


def _generate_local(args, spec, config, parser) -> int:
    from .config import ConfigError
    from .generate import check_shape, default_size, load_pipeline, run_rank
    from .launch import LaunchEnvironmentError, discover
    from .threads import RankFailed, run_in_threads

    try:
        launched = discover()
    except LaunchEnvironmentError:
        launched = None
    if launched is not None and launched.world_size > 1:
        parser.error(
            f"this process is rank {launched.rank} of {launched.world_size} started by {launched.source}; "
            "the local transport runs ranks as threads of one process: choose --transport torch, mpi or zmq"
        )
    world = args.nproc or 1
    _quiet_libraries()
    try:
        first = load_pipeline(spec.model, spec.scheduler)
        height, width = spec.height or default_size(first)[0], spec.width or default_size(first)[1]
        check_shape(first, height, width, world, config)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(str(exc))
    baseline = _baseline(first, spec, height, width) if args.compare else None
    pipes = [first] + [load_pipeline(spec.model, spec.scheduler) for _ in range(world - 1)]
    try:
        results = run_in_threads(world, lambda tr: run_rank(pipes[tr.rank], tr, spec, config), config.timeout_s * 4)
    except RankFailed as exc:
        print(f"pcpp generate: {exc}", file=sys.stderr)
        return 1
    latents = results[0][0]
    stats = [r[1] for r in results]
    _finish(args, spec, config, first, latents, stats, baseline, height, width, transport="local")
    return 0


def _generate_grid(args, spec, config, parser) -> int:
    """``--grid``: every policy on ``--nproc`` thread ranks against one worker, one picture."""
    from .config import ConfigError
    from .generate import check_shape, default_size, write_atomically
    from .grid import grid_policies, load_quiet_pipelines, render_grid, run_one_worker, run_policy
    from .threads import RankFailed

    world = args.nproc or 2
    if args.transport != "local":
        parser.error(f"--grid runs every policy in this process over the local transport; leave out --transport {args.transport}")
    if world < 2:
        parser.error(f"--grid compares policies across workers: --nproc must be at least 2, got {world}")
    _quiet_libraries()
    try:
        pipes = load_quiet_pipelines(spec.model, 1, spec.scheduler)
        height, width = spec.height or default_size(pipes[0])[0], spec.width or default_size(pipes[0])[1]
        check_shape(pipes[0], height, width, world, config)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(str(exc))
    pipes += load_quiet_pipelines(spec.model, world - 1, spec.scheduler)
    policies = grid_policies(config.portion, config.warmup_steps, config.timeout_s)
    output = args.output or os.path.join("out", "grid.png")
    runs = []
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=1 + len(policies), desc="grid", unit="run", file=sys.stderr)
        reference = run_one_worker(pipes[0], spec, height, width)
        runs.append(reference)
        bar.update()
        for label, policy_config in policies:
            bar.set_postfix_str(label)
            runs.append(run_policy(pipes, spec, height, width, world, policy_config, label, reference))
            bar.update()
        bar.close()
    except RankFailed as exc:
        print(f"pcpp generate --grid: {exc}", file=sys.stderr)
        return 1
    title = f'"{spec.prompt}"  seed {spec.seed}, {spec.steps} steps ({config.warmup_steps} warm-up), {world} workers'
    render_grid(runs, title, output)
    report = {"model": spec.model, "prompt": spec.prompt, "seed": spec.seed, "steps": spec.steps,
              "warmup_steps": config.warmup_steps, "world_size": world, "height": height, "width": width,
              "runs": [run.to_dict() for run in runs]}
    if args.report:
        write_atomically(args.report, lambda path: path.write_text(json.dumps(report, indent=2) + "\n"))
    for run in runs[1:]:
        quality = "identical" if run.psnr_db is None else f"image PSNR {run.psnr_db:.2f} dB, SSIM {run.ssim:.4f}"
        print(f"  {run.label:>14}: {quality}, {run.mb_per_step:.3f} MB received per rank per step")
    print(f"  grid: {output}" + (f"\n  report: {args.report}" if args.report else ""), flush=True)
    return 0


def _baseline(pipe, spec, height: int, width: int) -> dict[str, Any]:
    """One worker, same seed: the reference latent and its time."""
    import time

    from .generate import call_pipeline

    pipe.set_progress_bar_config(desc="denoising (1 worker, reference)")
    start = time.perf_counter()
    latents = call_pipeline(pipe, spec, height, width)
    return {"latents": latents, "seconds": time.perf_counter() - start}


def _finish(args, spec, config, pipe, latents, stats, baseline, height, width, transport: str) -> dict[str, Any]:
    """Rank 0: decode, compare, write the image and the report, print a summary."""
    from .generate import decode_image, psnr, write_atomically

    report: dict[str, Any] = {
        "model": spec.model,
        "prompt": spec.prompt,
        "seed": spec.seed,
        "scheduler": type(pipe.scheduler).__name__,
        "guidance_scale": spec.guidance_scale,
        "world_size": len(stats),
        "policy": config.policy,
        "portion": config.portion,
        "warmup_steps": config.warmup_steps,
        "partitioner": config.partitioner,
        "cfg_parallel": config.cfg_split,
        "transport": transport,
        "steps": spec.steps,
        "denoiser_calls": stats[0]["denoiser_calls"],
        "height": height,
        "width": width,
        "denoise_seconds": max(s["denoise_seconds"] for s in stats),
        "denoise_seconds_per_rank": [s["denoise_seconds"] for s in stats],
        "bytes_received_per_step": [s["received_per_step"]["total"] for s in stats],
        "bytes_sent_per_step": [s["sent_per_step"]["total"] for s in stats],
        "bytes_received_per_step_by_kind": [_without_total(s["received_per_step"]) for s in stats],
        "transport_bytes_received": [s["transport_counters"]["payload_received"] for s in stats],
        "engine_bytes_received": [s["engine_bytes_received"] for s in stats],
        "stale_buffer_bytes": [sum(s["stale_buffer_bytes"].values()) for s in stats],
        "peak_rss_bytes": [s["peak_rss_bytes"] for s in stats],
    }
    image, pixels = decode_image(pipe, latents)
    if baseline is not None:
        reference = baseline["latents"]
        ref_image, ref_pixels = decode_image(pipe, reference)
        value = psnr(latents, reference)
        report.update(
            psnr_db=None if math.isinf(value) else value,
            identical=bool(torch_equal(latents, reference)),
            max_abs_diff=float((latents - reference).abs().max()),
            image_psnr_db=_finite(psnr((pixels / 2 + 0.5).clamp(0, 1), (ref_pixels / 2 + 0.5).clamp(0, 1), 1.0)),
            baseline_seconds=baseline["seconds"],
            speedup=baseline["seconds"] / report["denoise_seconds"],
        )
    if args.output:
        write_atomically(args.output, lambda path: image.save(path, format="PNG"))
    if args.report:
        write_atomically(args.report, lambda path: path.write_text(json.dumps(report, indent=2) + "\n"))
    _print_summary(report, args)
    return report


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def _without_total(kinds: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in kinds.items() if k != "total"}


def _print_summary(report: dict[str, Any], args) -> None:
    mb = [b / 1e6 for b in report["bytes_received_per_step"]]
    lines = [
        f"{report['world_size']} worker(s) over {report['transport']}, policy {report['policy']}"
        + (f" (portion {report['portion']})" if report["policy"] == "partial" else "")
        + f", {report['steps']} steps ({report['warmup_steps']} warm-up), {report['width']}x{report['height']} px",
        f"  denoising: {report['denoise_seconds']:.2f} s (slowest rank)",
        f"  received per step after warm-up: {', '.join(f'{m:.3f}' for m in mb)} MB (by rank)",
    ]
    if "psnr_db" in report:
        psnr_text = "identical" if report["identical"] else f"{report['psnr_db']:.2f} dB"
        lines.append(
            f"  vs one worker: latent PSNR {psnr_text}, max |diff| {report['max_abs_diff']:.2e}, "
            f"speed-up {report['speedup']:.2f}x ({report['baseline_seconds']:.2f} s for one worker)"
        )
    if args.output:
        lines.append(f"  image: {args.output}")
    if args.report:
        lines.append(f"  report: {args.report}")
    print("\n".join(lines), flush=True)


def _quiet_libraries() -> None:
    """diffusers/transformers chatter (weight-loading bars, torchvision notices) hides our output."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
