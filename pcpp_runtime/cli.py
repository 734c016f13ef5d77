"""The ``pcpp`` command.

``pcpp generate`` runs one text-to-image job split over N workers. Only the standard library
is imported before a subcommand needs more, so ``pcpp --help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .config import CUDA_GRAPH_MODES
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
    g.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="run the strip forward of displaced steps through torch.compile(fullgraph=True), with BACKEND (default: "
        "torch's, inductor); the first displaced step pays the compile time",
    )
    g.add_argument(
        "--cuda-graphs",
        choices=CUDA_GRAPH_MODES,
        default="auto",
        help="replay each phase of a step from a CUDA graph: not available yet, so on is refused; auto (default) and "
        "off run eager",
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
    """Build the job from the flags and run it on the ranks they name (pcpp_runtime.worker)."""
    from .config import ConfigError, ParallelConfig
    from .connect import TransportSettings
    from .jobs import JobSpec

    try:
        config = ParallelConfig(
            policy=args.policy,
            portion=args.portion,
            warmup_steps=args.warmup_steps,
            partitioner=args.partitioner,
            weights=args.weights,
            cfg_split=args.cfg_parallel,
            timeout_s=args.timeout,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
        )
        if args.cuda_graphs == "on":  # refused before any compute, with what to use instead
            import torch

            from .config import check_cuda_graphs

            check_cuda_graphs(args.cuda_graphs, torch.cuda.is_available())
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
    from .ranks import Launched, Threads
    from .registry import transports
    from .worker import GenerateJob, execute

    settings = TransportSettings(args.bind_addr, args.advertise_addr, args.port_range)
    job = GenerateJob(spec, config, args.transport, settings, args.device, args.compare, args.output, args.report)
    if args.transport == "local":
        return execute(job, Threads(args.nproc or 1))
    if args.transport not in transports:
        parser.error(f"unknown transport {args.transport!r}; choose one of: {', '.join(transports.names())}")
    if relaunch:  # N fresh processes of this job, each given the job as data
        command = [sys.executable, "-m", "pcpp_runtime.worker", json.dumps(job.to_json())]
        return _run_workers(args.nproc, command, parser, timeout_s=None, cpu_bind=args.cpu_bind)
    ranks = Launched(args.transport, settings, args.rank, args.world_size, args.master_addr, args.master_port,
                     expected_world_size=args.nproc)
    return execute(job, ranks)


def _generate_grid(args, spec, config, parser) -> int:
    """``--grid``: every policy on ``--nproc`` thread ranks against one worker, one picture."""
    from .config import ConfigError
    from .grid import run_grid
    from .threads import RankFailed
    from .worker import quiet_libraries

    world = args.nproc or 2
    if args.transport != "local":
        parser.error(f"--grid runs every policy in this process over the local transport; leave out --transport {args.transport}")
    if world < 2:
        parser.error(f"--grid compares policies across workers: --nproc must be at least 2, got {world}")
    quiet_libraries()
    try:
        result = run_grid(spec, world, config)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as exc:
        parser.error(str(exc))
    except RankFailed as exc:
        print(f"pcpp generate --grid: {exc}", file=sys.stderr)
        return 1
    output = args.output or os.path.join("out", "grid.png")
    result.write(output, args.report)
    print(result.summary())
    print(f"  grid: {output}" + (f"\n  report: {args.report}" if args.report else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
