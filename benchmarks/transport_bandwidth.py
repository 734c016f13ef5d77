"""Point-to-point latency and bandwidth of every transport: 2 ranks, ping-pong.

Usage::

    python benchmarks/transport_bandwidth.py                       # local, torch, zmq, mpi
    python benchmarks/transport_bandwidth.py --transports zmq,mpi --sizes 4096,1048576

Rank 0 sends a ``uint8`` buffer to rank 1, which sends it back; one-way time is half the round
trip (median over the iterations, after warm-up). Bandwidth is ``size / one-way time``. ``local``
runs the two ranks as threads of this process; ``torch`` (gloo) and ``zmq`` start one process
per rank on 127.0.0.1; ``mpi`` runs ``mpiexec -n 2`` found next to ``sys.executable``. Prints a
Markdown table. Both ranks share the machine, so on a small machine the numbers include
contention for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

DEFAULT_SIZES = (4 << 10, 1 << 20, 64 << 20)


def iterations(size: int) -> tuple[int, int]:
    """(warm-up, measured) round trips for a message size."""
    if size <= 64 << 10:
        return 50, 500
    if size <= 4 << 20:
        return 5, 50
    return 1, 5


def ping_pong(t: Any, sizes: list[int]) -> list[dict[str, float]]:
    """Run on both ranks of ``t``; rank 0 returns one row per size."""
    import torch

    from pcpp_runtime.bench.pingpong import one_way_seconds

    rows = []
    for size in sizes:
        warm, n = iterations(size)
        one_way = one_way_seconds(t, torch.zeros(size, dtype=torch.uint8), warm, n)
        rows.append({"size": size, "latency_us": one_way * 1e6, "gbps": size / one_way / 1e9, "iters": n})
    return rows


def make_transport(name: str, rank: int, port: int, timeout: float) -> Any:
    if name == "torch":
        from pcpp_runtime.transports.torch_dist import TorchDistTransport

        return TorchDistTransport(rank, 2, timeout, master_port=port)
    if name == "zmq":
        from pcpp_runtime.transports.zeromq import ZmqTransport

        return ZmqTransport(rank, 2, timeout, master_port=port, config_hash="bench")
    if name == "mpi":
        from pcpp_runtime.transports.mpi import MPITransport, install_abort_on_error

        install_abort_on_error()
        return MPITransport(rank, 2, timeout)
    raise ValueError(name)


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    rank = args.rank if args.rank is not None else int(os.environ.get("PMI_RANK", "0"))
    t = make_transport(args.transport, rank, args.port, args.timeout).connect()
    try:
        rows = ping_pong(t, args.size_list)
    finally:
        t.close()
    if rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    return 0


def run_local(sizes: list[int], timeout: float) -> list[dict[str, float]]:
    from pcpp_runtime.transports import LocalFabric

    fabric = LocalFabric(2)
    results: dict[int, Any] = {}

    def main(rank: int) -> None:
        results[rank] = ping_pong(fabric.transport(rank, timeout), sizes)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results[0]


def run_processes(name: str, sizes: list[int], timeout: float) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        base = [
            sys.executable,
            __file__,
            "--worker",
            "--transport",
            name,
            "--out",
            str(out),
            "--sizes",
            ",".join(map(str, sizes)),
            "--timeout",
            str(timeout),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if name == "mpi":
            mpiexec = Path(sys.executable).parent / "mpiexec"
            subprocess.run(
                [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", "2", *base], check=True, env=env, timeout=600
            )
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            procs = [subprocess.Popen([*base, "--rank", str(r), "--port", str(port)], env=env) for r in range(2)]
            codes = [p.wait(timeout=600) for p in procs]
            if any(codes):
                raise RuntimeError(f"{name} benchmark ranks exited with {codes}")
        return json.loads(out.read_text())


def human(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="local,torch,zmq,mpi")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--transport", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size_list = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        return worker(args)
    lines = [
        "| transport | message | one-way latency (µs, median) | bandwidth (GB/s) | round trips |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in args.transports.split(","):
        rows = (
            run_local(args.size_list, args.timeout)
            if name == "local"
            else run_processes(name, args.size_list, args.timeout)
        )
        for row in rows:
            lines.append(
                f"| {name} | {human(int(row['size']))} | {row['latency_us']:.1f} | {row['gbps']:.2f} | {row['iters']} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
