"""Compute of one strip of SDXL's UNet on one GPU: the per-strip step times the cost model uses.

    python benchmarks/gpu_strip_compute.py --out out/gpu_strip.json
    python benchmarks/gpu_strip_compute.py --model tiny --latent 32 --repeats 2   # CPU: a dry run

The model is the real SDXL base UNet's configuration (``pcpp_runtime.bench.model.MODELS["sdxl"]``,
2.57 G parameters) built from its config with random weights (nothing is downloaded), in float16
on the GPU, at a 128x128 latent (1024x1024 px), batch 2 (classifier-free guidance on one group)
and batch 1 (one CFG group). For N strips of 128/N rows it times one denoiser call two ways:

* ``stock``: the unwrapped UNet on a latent of 128/N rows and the full width (zero padding at
  the strip's edges, attention over the strip's own tokens only): a lower bound on a strip's
  compute;
* ``engine``: this project's displaced layers on rank ``r`` of N (the middle rank, which has two
  neighbours, for N > 2) over a compute-only transport whose messages complete at once (receive
  buffers keep their contents, all-gathers copy this rank's part into every slot). So the time
  is the strip's compute with everything the engine adds -- halo rows on every k x k convolution,
  attention over the gathered (synchronous step) or stale (displaced step) keys and values,
  group-norm statistics, the output gather's copies, the Python of its 156 layers -- and no
  communication. ``sync`` is the median synchronous (warm-up) step; ``full`` and
  ``partial(0.3)`` the median displaced step of those policies.

* ``stock_graph``: the stock UNet on the strip captured in a CUDA graph and replayed: the GPU's
  own time, without the host's cost of launching thousands of operators one by one (which bounds the
  eager calls from below on a slow host).

Timing: CUDA events around each call (so launch gaps count), after warm-up calls; the median over
the measured calls. Wall-clock times are recorded beside them. N = 1 is the whole latent (with
one rank the engine attaches nothing, so engine = stock).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pcpp_runtime.transports.base import CompletedWork, Transport, Work


class ComputeOnlyTransport(Transport):
    """Rank ``rank`` of ``world_size`` with no peers behind it: every message completes at once.

    A receive buffer is zeroed the first time it is seen and then keeps its contents; an
    all-gather copies this rank's input into every slot of the same size (zeros elsewhere), so
    group-norm statistics and attention stay finite. Objects are not supported.
    """

    name = "compute-only"

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size, 60.0)
        self._seen: set[int] = set()

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        self.counters.add_sent(buf.numel() * buf.element_size())
        return CompletedWork()

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        if buf.data_ptr() not in self._seen:
            self._seen.add(buf.data_ptr())
            buf.zero_()
        self.counters.add_received(buf.numel() * buf.element_size())
        return CompletedWork()

    def iall_gather(self, outputs, input: torch.Tensor) -> Work:
        for peer, out in enumerate(outputs):
            if out.numel() == input.numel():
                out.copy_(input.view_as(out))
            else:
                out.zero_()
        return CompletedWork()

    def send_object(self, obj: Any, dst: int) -> None:
        raise NotImplementedError("the compute-only transport carries no objects")

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        raise NotImplementedError("the compute-only transport carries no objects")

    def close(self) -> None:
        pass


class Timer:
    """Times calls with CUDA events on a GPU (perf_counter on the CPU); also records wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> tuple[float, float]:
        """(device seconds, wall seconds) of one call of ``fn``."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            wall = time.perf_counter()
            start.record()
            fn()
            end.record()
            wall = time.perf_counter() - wall
            end.synchronize()
            return start.elapsed_time(end) / 1e3, wall
        wall = time.perf_counter()
        fn()
        wall = time.perf_counter() - wall
        return wall, wall


def build(model: str, device: torch.device, dtype: torch.dtype):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from pcpp_runtime.bench.model import MODELS

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not minutes on the host
        unet = UNet2DConditionModel(**MODELS[model].config)
    return unet.to(dtype).eval().requires_grad_(False)


def inputs_for(model: str, latent: int, batch: int, device: torch.device, dtype: torch.dtype):
    from pcpp_runtime.bench.model import make_inputs

    inputs = make_inputs(model, latent, batch=batch, device=str(device))
    cond = {k: v.to(dtype) for k, v in inputs.added_cond_kwargs.items()}
    return inputs.latents.to(dtype), inputs.encoder_hidden_states.to(dtype), cond


def stock_times(unet, latents, hidden, cond, rows: int, timer: Timer, warmup: int, repeats: int) -> dict[str, float]:
    strip = latents[:, :, :rows].contiguous()
    device_s, wall_s = [], []
    with torch.no_grad():
        for i in range(warmup + repeats):
            d, w = timer(lambda: unet(strip, 500, encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False))
            if i >= warmup:
                device_s.append(d)
                wall_s.append(w)
    return {"stock_ms": 1e3 * statistics.median(device_s), "stock_wall_ms": 1e3 * statistics.median(wall_s)}


def graph_times(unet, latents, hidden, cond, rows: int, timer: Timer, repeats: int) -> dict[str, float]:
    """The stock UNet on the strip captured once in a CUDA graph and replayed: the GPU's own time
    for the strip, without the host's per-operator launch cost."""
    static = latents[:, :, :rows].contiguous()
    timestep = torch.tensor(500, device=static.device)

    def call():
        return unet(static, timestep, encoder_hidden_states=hidden, added_cond_kwargs=cond, return_dict=False)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        times = [timer(graph.replay)[0] for _ in range(repeats)]
    del graph
    torch.cuda.empty_cache()
    return {"stock_graph_ms": 1e3 * statistics.median(times)}


def engine_times(unet, latents, hidden, cond, strips: int, policy: str, timer: Timer, warmup_steps: int,
                 steps: int, generations: int) -> dict[str, Any]:
    """Median synchronous and displaced step of rank ``r`` of ``strips`` over the compute-only
    transport (the last generation; earlier ones warm up)."""
    from pcpp_runtime import ParallelConfig, parallelize

    rank = 1 if strips > 2 else 0
    transport = ComputeOnlyTransport(rank, strips)
    config = ParallelConfig(policy=policy, portion=0.3, warmup_steps=warmup_steps)
    wrapped = parallelize(unet, transport, config, num_steps=steps)
    try:
        with torch.no_grad():
            for _ in range(generations):
                device_s, wall_s = [], []
                for _ in range(steps):
                    d, w = timer(lambda: wrapped(latents, 500, encoder_hidden_states=hidden, added_cond_kwargs=cond,
                                                 return_dict=False))
                    device_s.append(d)
                    wall_s.append(w)
        bounds = wrapped.runtime.plan.bounds[rank]
    finally:
        wrapped.remove()
    return {
        "rank": rank,
        "strip_rows": bounds[1] - bounds[0],
        "sync_ms": 1e3 * statistics.median(device_s[:warmup_steps]),
        "displaced_ms": 1e3 * statistics.median(device_s[warmup_steps:]),
        "sync_wall_ms": 1e3 * statistics.median(wall_s[:warmup_steps]),
        "displaced_wall_ms": 1e3 * statistics.median(wall_s[warmup_steps:]),
        "steps_ms": [round(1e3 * s, 3) for s in device_s],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sdxl")
    parser.add_argument("--latent", type=int, default=128)
    parser.add_argument("--batches", default="2,1")
    parser.add_argument("--strips", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=10, help="measured calls of the stock UNet")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls of the stock UNet")
    parser.add_argument("--steps", type=int, default=14, help="denoiser calls per engine generation")
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps of each engine generation")
    parser.add_argument("--generations", type=int, default=2, help="engine generations (the last is measured)")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph replay of the stock UNet")
    parser.add_argument("--dtype", default=None, help="float16 on a GPU, float32 on the CPU")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    import diffusers

    started = time.time()
    unet = build(args.model, device, dtype)
    built_s = time.time() - started
    timer = Timer(device)
    result: dict[str, Any] = {
        "what": "one denoiser call of one strip: stock UNet on the strip (lower bound) and the pcpp engine's rank "
        "over a compute-only transport (no communication); medians of CUDA-event times",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "model": args.model,
        "parameters": sum(p.numel() for p in unet.parameters()),
        "dtype": str(dtype).replace("torch.", ""),
        "latent": args.latent,
        "attention_processor": type(next(iter(unet.attn_processors.values()))).__name__,
        "stock_warmup_calls": args.warmup,
        "stock_measured_calls": args.repeats,
        "engine_steps": args.steps,
        "engine_warmup_steps": args.warmup_steps,
        "engine_generations": args.generations,
        "build_seconds": round(built_s, 1),
        "rows": [],
    }
    print(f"{result['device']}: {args.model} UNet, {result['parameters'] / 1e9:.2f} G parameters, {result['dtype']}, "
          f"built in {built_s:.1f} s; latent {args.latent}x{args.latent}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        latents, hidden, cond = inputs_for(args.model, args.latent, batch, device, dtype)
        for strips in (int(n) for n in args.strips.split(",")):
            rows = args.latent // strips
            row: dict[str, Any] = {"batch": batch, "strips": strips, "rows": rows}
            row.update(stock_times(unet, latents, hidden, cond, rows, timer, args.warmup, args.repeats))
            if device.type == "cuda" and not args.no_graphs:
                try:
                    row.update(graph_times(unet, latents, hidden, cond, rows, timer, args.repeats))
                except Exception as exc:  # noqa: BLE001 - record it and go on
                    row["graph_error"] = f"{type(exc).__name__}: {exc}"
            if strips == 1:
                row.update(sync_ms=row["stock_ms"], full_ms=row["stock_ms"], partial_ms=row["stock_ms"])
            else:
                try:
                    full = engine_times(unet, latents, hidden, cond, strips, "full", timer, args.warmup_steps,
                                        args.steps, args.generations)
                    partial = engine_times(unet, latents, hidden, cond, strips, "partial", timer, args.warmup_steps,
                                           args.steps, args.generations)
                except Exception as exc:  # noqa: BLE001 - record it and go on with the stock numbers
                    row["engine_error"] = f"{type(exc).__name__}: {exc}"
                else:
                    row.update(rank=full["rank"], strip_rows=full["strip_rows"], sync_ms=full["sync_ms"],
                               full_ms=full["displaced_ms"], partial_ms=partial["displaced_ms"],
                               sync_wall_ms=full["sync_wall_ms"], full_wall_ms=full["displaced_wall_ms"],
                               partial_wall_ms=partial["displaced_wall_ms"],
                               full_steps_ms=full["steps_ms"], partial_steps_ms=partial["steps_ms"])
            result["rows"].append(row)
            write(args.out, result)  # after every row: a run stopped at its time limit keeps what it measured
            graphed = f" (CUDA graph {row['stock_graph_ms']:.2f} ms)" if "stock_graph_ms" in row else row.get("graph_error", "")
            print(f"  batch {batch}, {strips} strip(s) of {rows} rows: stock {row['stock_ms']:.2f} ms{graphed}"
                  + (f"; engine sync {row['sync_ms']:.2f}, full {row['full_ms']:.2f}, partial(0.3) "
                     f"{row['partial_ms']:.2f} ms" if "sync_ms" in row else f"; {row.get('engine_error')}"),
                  flush=True)
        del latents, hidden, cond
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["seconds"] = round(time.time() - started, 1)
    write(args.out, result)


def write(path: str, result: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
