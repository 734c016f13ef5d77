"""Start the N worker processes of one benchmark point with the local launcher.

    python -m pcpp_runtime.bench.launcher --nproc N [--timeout S] [--cpu-bind cores] \
        [--netns NS0,NS1 --addrs A0,A1] -- COMMAND ...

A thin front of :func:`pcpp_runtime.launch.run_workers` (fresh processes, torchrun-style
variables, every line prefixed with its rank, all workers stopped when one fails), run as its own
process so the benchmark runner can read the workers' output through a pipe.

With ``--netns`` rank r runs inside network namespace ``NS_r`` (through ``ip netns exec``) and is
told to bind ``A_r``; ``MASTER_ADDR`` is ``A_0``, so the ranks talk over the veth pair that joins
the namespaces (see :mod:`pcpp_runtime.bench.netns`).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from collections.abc import Sequence

from pcpp_runtime.launch.local import CPU_BIND_MODES

# rank r's command runs as `sh -c 'exec ip netns exec "$PCPP_BENCH_NETNS" "$@"' pcpp-bench COMMAND...`
_IN_NETNS = 'exec "$PCPP_BENCH_IP" netns exec "$PCPP_BENCH_NETNS" "$@"'


def _netns_env(names: list[str], addrs: list[str], rank: int) -> dict[str, str]:
    return {
        "PCPP_BENCH_NETNS": names[rank],
        "PCPP_BENCH_BIND_ADDR": addrs[rank],
        "PCPP_BENCH_ADVERTISE_ADDR": addrs[rank],
        "MASTER_ADDR": addrs[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    from pcpp_runtime.launch import run_workers

    parser = argparse.ArgumentParser(prog="python -m pcpp_runtime.bench.launcher")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--cpu-bind", choices=CPU_BIND_MODES, default="none", help="cores: one share of the CPUs per rank")
    parser.add_argument("--netns", default=None, help="comma-separated namespace per rank")
    parser.add_argument("--addrs", default=None, help="comma-separated address per rank (with --netns)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else list(args.command)
    if not command:
        parser.error("no command given")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    extra_env = None
    if args.netns:
        names = args.netns.split(",")
        addrs = (args.addrs or "").split(",")
        if len(names) != args.nproc or len(addrs) != args.nproc:
            parser.error(f"--netns and --addrs need one entry per rank ({args.nproc})")
        command = ["sh", "-c", _IN_NETNS, "pcpp-bench", *command]
        env["PCPP_BENCH_IP"] = shutil.which("ip") or "ip"

        extra_env = functools.partial(_netns_env, names, addrs)

    return run_workers(
        args.nproc, command, env=env, extra_env_for_rank=extra_env, timeout_s=args.timeout, cpu_bind=args.cpu_bind
    )


if __name__ == "__main__":
    sys.exit(main())
