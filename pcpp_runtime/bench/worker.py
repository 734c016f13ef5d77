"""One process of one benchmark point (started by :mod:`pcpp_runtime.bench.runner`).

    python -m pcpp_runtime.bench.worker --role baseline --spec '{...}' --out DIR
    python -m pcpp_runtime.bench.worker --role overhead --spec '{...}' --out DIR
    <launcher> python -m pcpp_runtime.bench.worker --role parallel --spec '{...}' --out DIR

Roles:

* ``baseline`` -- one worker, the stock UNet in the plain DDIM loop (no wrapper, no transport).
* ``overhead`` -- world size 1: the stock UNet and the same UNet wrapped by ``parallelize`` (an
  in-process transport of one rank), alternated ``repeats`` times in this one process.
* ``parallel`` -- one rank of N, started by a launcher (``pcpp_runtime.bench.launcher`` for
  ``zmq``/``torch``, ``mpiexec`` for ``mpi``): rank discovery and the transport are the ones
  ``pcpp generate`` uses. Rank 0 gathers every rank's statistics over the transport's object path.

Each writes ``DIR/result.json`` (rank 0) and ``DIR/latent.pt`` (the final latent, this process's
own file). Torch runs one thread (``torch.set_num_threads(1)``; the launcher sets
``OMP_NUM_THREADS=1``). Rank 0 prints ``@@pcpp-bench progress I N`` after each step so the runner
can draw a progress bar. Network-namespace runs pass the addresses to bind through
``PCPP_BENCH_BIND_ADDR`` / ``PCPP_BENCH_ADVERTISE_ADDR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pcpp_runtime.accounting import peak_rss_bytes
from pcpp_runtime.files import write_json

PROGRESS_PREFIX = "@@pcpp-bench progress"


def _progress(done: int, total: int) -> None:
    print(f"{PROGRESS_PREFIX} {done} {total}", flush=True)


def _prepare() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)


def run_baseline(spec: dict[str, Any], out: Path, report_progress: bool = True) -> dict[str, Any]:
    import torch

    from .model import build_unet, denoise, make_inputs, make_scheduler

    unet = build_unet(spec["model"])
    inputs = make_inputs(spec["model"], spec["latent"], spec["seed"])
    scheduler = make_scheduler(spec["steps"])
    steps: list[float] = []

    def on_step(i: int, seconds: float) -> None:
        steps.append(seconds)
        if report_progress:
            _progress(i + 1, spec["steps"])

    cpu = time.process_time()
    start = time.perf_counter()
    latents = denoise(unet, scheduler, inputs, on_step=on_step)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    torch.save(latents, out / "latent.pt")
    result = {
        "role": "baseline",
        "seconds": seconds,
        "step_seconds": steps,
        "cpu_seconds": cpu,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "result.json", result, indent=1)
    return result


def run_overhead(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """Stock against wrapped at world size 1, alternated in one process (same inputs)."""
    import torch

    from pcpp_runtime import ParallelConfig, parallelize
    from pcpp_runtime.transports.local import LocalFabric

    from .model import build_unet, denoise, make_inputs, make_scheduler

    unet = build_unet(spec["model"])
    inputs = make_inputs(spec["model"], spec["latent"], spec["seed"])
    config = ParallelConfig(policy=spec["policy"], portion=spec["portion"], warmup_steps=spec["warmup"])
    transport = LocalFabric(1).transport(0, 60.0)
    wrapped = parallelize(unet, transport, config, num_steps=spec["steps"])
    repeats = int(spec.get("repeats", 2))
    total = 2 * repeats * spec["steps"]
    done = 0
    times: dict[str, list[float]] = {"stock": [], "wrapped": []}
    finals: dict[str, Any] = {}

    def on_step(i: int, seconds: float) -> None:
        nonlocal done
        done += 1
        _progress(done, total)

    # one untimed 2-step generation each first: the first calls in a process pay for allocations
    # and kernel selection, which would otherwise count against whichever side runs first (at
    # world size 1 nothing is attached to the model, so the wrapper takes any number of steps)
    for denoiser in (unet, wrapped):
        denoise(denoiser, make_scheduler(2), inputs)
    for r in range(repeats):
        # alternate which goes first, so a drift in machine load does not favour one side
        order = ("stock", "wrapped") if r % 2 == 0 else ("wrapped", "stock")
        for which in order:
            scheduler = make_scheduler(spec["steps"])
            denoiser = unet if which == "stock" else wrapped
            start = time.perf_counter()
            finals[which] = denoise(denoiser, scheduler, inputs, on_step=on_step)
            times[which].append(time.perf_counter() - start)
    torch.save(finals["wrapped"], out / "latent.pt")
    result = {
        "role": "overhead",
        "stock_seconds": times["stock"],
        "wrapped_seconds": times["wrapped"],
        "identical": bool(torch.equal(finals["stock"], finals["wrapped"])),
        "peak_rss_bytes": peak_rss_bytes(),
        "stale_buffer_bytes": wrapped.stale_buffer_bytes(),
    }
    write_json(out / "result.json", result, indent=1)
    return result


def run_parallel(spec: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """One rank of N through the job API's rank lifecycle (:func:`pcpp_runtime.ranks.run_on_ranks`):
    build the model, connect, run the DDIM loop wrapped, gather every rank's figures on rank 0."""
    import torch

    from pcpp_runtime import ParallelConfig, parallelize
    from pcpp_runtime.connect import TransportSettings
    from pcpp_runtime.ranks import Launched, run_on_ranks

    from .model import build_unet, denoise, make_inputs, make_scheduler

    config = ParallelConfig(
        policy=spec["policy"], portion=spec["portion"], warmup_steps=spec["warmup"], timeout_s=spec.get("timeout", 300.0)
    )
    settings = TransportSettings()
    if spec["transport"] != "mpi":  # network-namespace runs bind the veth address
        settings = TransportSettings(bind_addr=os.environ.get("PCPP_BENCH_BIND_ADDR") or None)
    if spec["transport"] == "zmq":
        settings = dataclasses.replace(settings, advertise_addr=os.environ.get("PCPP_BENCH_ADVERTISE_ADDR") or None)

    def prepare(place):
        start = time.perf_counter()
        model = (build_unet(spec["model"]), make_inputs(spec["model"], spec["latent"], spec["seed"]), make_scheduler(spec["steps"]))
        return model, time.perf_counter() - start

    def work(prepared, transport):
        (unet, inputs, scheduler), build_seconds = prepared
        wrapped = parallelize(unet, transport, config, num_steps=spec["steps"])
        steps: list[float] = []

        def on_step(i: int, seconds: float) -> None:
            steps.append(seconds)
            if transport.rank == 0:
                _progress(i + 1, spec["steps"])

        before = transport.counters.snapshot()
        transport.barrier()  # every rank starts the clock together
        cpu = time.process_time()
        start = time.perf_counter()
        latents = denoise(wrapped, scheduler, inputs, on_step=on_step)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        after = transport.counters.snapshot()
        runtime = wrapped.runtime
        displaced = range(min(spec["warmup"], spec["steps"]), spec["steps"])
        # the barrier's all-reduce moved one byte from every other rank (base-class barrier)
        barrier_bytes = transport.world_size - 1
        stats = {
            "rank": transport.rank,
            "seconds": seconds,
            "step_seconds": steps,
            "cpu_seconds": cpu,
            "build_seconds": build_seconds,
            "received_per_step": runtime.ledger.per_step_mean(displaced, "received"),
            "sent_per_step": runtime.ledger.per_step_mean(displaced, "sent"),
            "received_per_step_warmup": runtime.ledger.per_step_mean(range(0, min(spec["warmup"], spec["steps"])), "received"),
            "engine_bytes_received": runtime.ledger.total("received"),
            "engine_bytes_sent": runtime.ledger.total("sent"),
            "transport_bytes_received": after["payload_received"] - before["payload_received"] - barrier_bytes,
            "transport_bytes_sent": after["payload_sent"] - before["payload_sent"] - barrier_bytes,
            "transport_messages_received": after["messages_received"] - before["messages_received"],
            "stale_buffer_bytes": wrapped.stale_buffer_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }
        return latents, stats

    gathered = run_on_ranks(Launched(spec["transport"], settings), config, prepare, work, device="cpu")
    if gathered is None:
        return None
    torch.save(gathered.value, out / "latent.pt")
    result = {"role": "parallel", "world_size": len(gathered.stats), "ranks": gathered.stats}
    write_json(out / "result.json", result, indent=1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcpp_runtime.bench.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("baseline", "overhead", "parallel"), required=True)
    parser.add_argument("--spec", required=True, help="the point, as JSON")
    parser.add_argument("--out", required=True, help="folder for result.json and latent.pt")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _prepare()
    if args.role == "baseline":
        run_baseline(spec, out)
    elif args.role == "overhead":
        run_overhead(spec, out)
    else:
        run_parallel(spec, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
