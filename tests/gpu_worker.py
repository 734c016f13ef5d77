"""One rank of a GPU test job (``tests/test_gpu.py``): ``python gpu_worker.py --mode M ...``.

Started once per rank (``--rank``/``--world-size``/``--port``) or by ``mpiexec -n N``. Every
rank writes ``<out>/rank<r>.json`` with ``ok`` and the result or the error and traceback.

Modes:

* ``transport``: CUDA buffers both ways, all-gather, objects and a barrier
  (``transport_worker.scenario_gpu``), over a transport whose backend the test picks
  (``--backend gloo`` puts CUDA buffers on gloo: several ranks sharing one GPU, where NCCL
  refuses to run).
* ``engine``: tiny-sd on the device under each of ``--policies``; rank 0 saves the final latent
  of each as ``<out>/<policy>.pt`` (on the CPU). TF32 is off, so results compare at float32
  precision with the one-device run of ``test_gpu.py``.
* ``bandwidth``: ping-pong of device buffers between ranks 0 and 1; rank 0 returns one row per
  size (one-way time = half the round trip, median).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "transports")]

import torch  # noqa: E402

from pcpp_runtime.transports import Transport  # noqa: E402


def make_transport(args: argparse.Namespace, rank: int) -> Transport:
    if args.transport == "torch":
        from pcpp_runtime.transports.torch_dist import TorchDistTransport

        return TorchDistTransport(
            rank, args.world_size, args.timeout, master_port=args.port, device=args.device, backend=args.backend
        )
    if args.transport == "zmq":
        from pcpp_runtime.transports.zeromq import ZmqTransport

        return ZmqTransport(rank, args.world_size, args.timeout, master_port=args.port, config_hash="gpu", device=args.device)
    if args.transport == "mpi":
        from pcpp_runtime.transports.mpi import MPITransport, install_abort_on_error

        install_abort_on_error()
        return MPITransport(rank, args.world_size, args.timeout, device=args.device)
    raise SystemExit(f"unknown transport {args.transport}")


def mode_transport(t: Transport, args: argparse.Namespace) -> Any:
    from transport_worker import scenario_gpu

    result = scenario_gpu(t, args)
    result["cuda_aware"] = getattr(t, "cuda_aware", None)
    result["backend"] = getattr(t, "backend", None)
    return result


def mode_engine(t: Transport, args: argparse.Namespace) -> Any:
    from e2e_worker import SIZE, SPEC, config_for
    from engine_helpers import quiet_pipeline

    from pcpp_runtime import parallelize
    from pcpp_runtime.pipelines import call_pipeline, resolve_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pipe = quiet_pipeline(resolve_model("tiny-sd"), device=args.device)
    seconds = {}
    for policy in args.policies.split(","):
        wrapped = parallelize(pipe, t, config_for(policy))
        start = time.perf_counter()
        latents = call_pipeline(wrapped, SPEC, *SIZE)
        seconds[policy] = time.perf_counter() - start
        assert latents.device.type == torch.device(args.device).type, latents.device
        if hasattr(wrapped, "denoiser"):
            wrapped.denoiser.remove()
        if t.rank == 0:
            torch.save(latents.cpu(), Path(args.out) / f"{policy}.pt")
    return {"seconds": seconds, "counters": t.counters.snapshot()}


def mode_bandwidth(t: Transport, args: argparse.Namespace) -> Any:
    from pcpp_runtime.bench.pingpong import one_way_seconds

    dev = torch.device(args.device)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        warm, n = (3, 20) if size <= 4 << 20 else (2, 8)
        one_way = one_way_seconds(t, torch.zeros(size, dtype=torch.uint8, device=dev), warm, n)
        rows.append({"bytes": size, "one_way_s": one_way, "GB_per_s": size / one_way / 1e9})
    t.barrier()
    return rows if t.rank == 0 else None


MODES = {"transport": mode_transport, "engine": mode_engine, "bandwidth": mode_bandwidth}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=sorted(MODES))
    parser.add_argument("--transport", required=True)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--policies", default="sync,full,partial")
    parser.add_argument("--sizes", default=f"{1 << 20},{16 << 20},{64 << 20}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = os.environ
    rank = args.rank if args.rank is not None else int(env.get("PMI_RANK", env.get("OMPI_COMM_WORLD_RANK", "0")))
    if args.world_size is None:
        args.world_size = int(env.get("PMI_SIZE", env.get("OMPI_COMM_WORLD_SIZE", "1")))
    torch.set_num_threads(2)
    if args.device == "cuda":  # one GPU per rank where there are enough, else all on GPU 0
        args.device = f"cuda:{rank % torch.cuda.device_count()}"
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    out = Path(args.out) / f"rank{rank}.json"
    start = time.monotonic()
    record: dict[str, Any] = {"rank": rank}
    t = None
    try:
        t = make_transport(args, rank)
        t.connect()
        record["result"] = MODES[args.mode](t, args)
        record["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        record.update(ok=False, error_type=type(exc).__name__, error=str(exc), traceback=traceback.format_exc())
        record["elapsed"] = time.monotonic() - start
        out.write_text(json.dumps(record, default=str))
        raise
    finally:
        if t is not None and (record.get("ok") or args.transport != "mpi"):
            t.close()
    record["elapsed"] = time.monotonic() - start
    out.write_text(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
