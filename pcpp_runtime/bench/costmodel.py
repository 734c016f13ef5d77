"""A cost model: step time for N workers from compute per strip and bytes per step over a link.

For rank r of N at a link of payload bandwidth ``bw`` (bytes/s each way) and per-message
latency ``lat``, with bytes from :mod:`pcpp_runtime.formulas` (``B_sync``: context a synchronous
step exchanges, ``B_disp``: the stale context a displaced step receives, ``B_out``: the output
all-gather, received every step), ``C_sync``/``C_disp`` the compute time of one strip at a
synchronous/displaced step and ``E`` the number of blocking exchanges of a synchronous step::

    synchronous step  T_s = C_sync + (B_sync + B_out) / bw + E * lat   (B_sync: see tbf below)
    displaced step    T_d = max(C_disp, B_disp / bw) + B_out / bw + lat
    generation        T   = w * T_s + B_disp / bw + (S - w) * T_d        (w warm-up steps of S)

At a displaced step every layer sends this step's context as soon as it has it and waits for the
previous step's only when it needs it, so the stale context has a whole step to arrive: the step
takes the longer of compute and transfer. The output all-gather ends every step and is not
hidden. The step before the first displaced one also sends the first stale context (the lone
``B_disp / bw``). The slowest rank sets the pace (the middle ranks receive from two neighbours).

**Calibration** (CPU workers): ``C_sync`` and ``C_disp`` are the median warm-up and displaced step
times of the same point measured on an unthrottled link (their own transfers there take
milliseconds); the model then adds the throttled link's transfer times and is checked against
the throttled runs (:func:`check_throttled`). A tbf-limited veth carries TCP payload at
``rate / 8 * 1448 / 1514`` bytes/s (MSS over the Ethernet frame tbf counts), and its token bucket
(10 ms of traffic) refills while a rank computes, so at a synchronous step each of the E blocking
exchanges (one per layer, ``b_j`` bytes) costs ``max(0, b_j - min(burst, bw * C_sync / E)) / bw``
instead of ``b_j / bw``; GPU links have no such allowance.

**GPUs** (:func:`predict_gpus`): bytes from the formulas on the real SDXL UNet's configuration
built on the meta device (no weights); the links' transfers are modelled, compute is measured on
one GPU for the strip's batch and height (:class:`GpuTimes`, a data file written from
``benchmarks/gpu_strip_compute.py``'s runs), and one GPU's step is the same measurement on the
whole latent. ``compute="h100"`` (the default): the stock UNet on the strip replayed from a CUDA graph,
the GPU's own time (a lower bound on a strip's compute: an upper bound on speed-up);
``"h100-eager"``: the engine's synchronous and displaced steps in eager PyTorch on the lent
machine, bound by its host's operator launches. ``compute="a100"`` (or ``step_time_s``) divides a
published one-GPU step time by the number of GPUs instead (ideal scaling).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "LINKS",
    "GpuTimes",
    "Link",
    "check_throttled",
    "formula_bytes",
    "generation_time",
    "gpu_compute",
    "predict_gpus",
    "tbf_link",
]

# Ethernet frame (1500-byte MTU + 14-byte header, what tbf counts) carrying 1448 bytes of TCP
# payload (1500 - 20 IP - 20 TCP - 12 timestamp option)
TCP_EFFICIENCY = 1448 / 1514


@dataclasses.dataclass(frozen=True)
class Link:
    """A link's payload bandwidth each way (bytes/s) and per-message latency (s)."""

    name: str
    bytes_per_s: float
    latency_s: float
    note: str = ""
    burst_bytes: float = 0.0  # a token bucket's depth (tbf): what an idle link sends at once


def tbf_link(rate: str | float, latency_s: float = 60e-6) -> Link:
    """The veth pair limited by tbf to ``rate`` (tc syntax) carrying TCP."""
    from .netns import parse_rate

    bits = parse_rate(rate)
    burst = max(16 * 1024, bits / 8 / 100)  # as pcpp_runtime.bench.netns.set_rate sets it
    return Link(f"veth tbf {rate}", bits / 8 * TCP_EFFICIENCY, latency_s, "tc tbf rate x TCP payload share 1448/1514",
                burst_bytes=burst * TCP_EFFICIENCY)


#: GPU interconnects, payload bandwidth per direction (assumptions stated in docs/BENCHMARKS.md)
LINKS: dict[str, Link] = {
    "nvlink": Link(
        "NVLink (A100 SXM, NVLink 3)",
        300e9 * 0.75,
        10e-6,
        "12 links x 25 GB/s = 300 GB/s per direction; 75% reached by NCCL point-to-point; 10 us per message",
    ),
    "nvlink4": Link(
        "NVLink (H100 SXM, NVLink 4)",
        450e9 * 0.75,
        10e-6,
        "18 links x 25 GB/s = 450 GB/s per direction; 75% reached by NCCL point-to-point; 10 us per message",
    ),
    "100gbe": Link(
        "100 Gbit/s Ethernet",
        100e9 / 8 * 0.9,
        25e-6,
        "12.5 GB/s per direction, 90% reached by large RDMA/TCP messages; 25 us per message",
    ),
}

@dataclasses.dataclass(frozen=True)
class GpuTimes:
    """GPU compute figures from a data file (``docs/benchmarks/gpu_strip_times.json``).

    Attributes:
        strip_times: name -> ``{"card", "source", "ms"}`` with ``ms[batch][strips][kind]`` one
            strip's denoiser call in milliseconds, measured on one GPU (``benchmarks/gpu_strip_compute.py``):
            kind ``stock`` (the unwrapped UNet on the strip alone), ``sync`` (a synchronous step),
            ``full`` and ``partial(0.3)`` (a displaced step); one strip is the whole latent, and
            ``ms[2][1]["stock"]`` is one GPU's step with the guidance batch of 2.
        published_step_times: name -> ``{"seconds", "source"}``, a published one-GPU step time
            (UNet with classifier-free guidance, batch 2) that is divided by the GPUs.
    """

    strip_times: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    published_step_times: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> GpuTimes:
        try:
            data = json.loads(Path(path).read_text())
            strip_times = {
                name: dict(entry, ms={int(b): {int(n): dict(kinds) for n, kinds in per.items()} for b, per in entry["ms"].items()})
                for name, entry in data["strip_times"].items()
            }
            return cls(strip_times, dict(data.get("published_step_times", {})))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"GPU strip times {path}: cannot read them ({type(exc).__name__}: {exc})") from None

    def names(self) -> list[str]:
        return [*self.strip_times, *self.published_step_times]


# ---------------------------------------------------------------------- bytes from the formulas
def _probe(model: str, latent: int, cache: dict | None):
    """(model plan, layer shapes) of a benchmark model at a square latent, on the meta device."""
    key = ("probe", model, latent)
    if cache is not None and key in cache:
        return cache[key]
    import torch

    from pcpp_runtime.formulas import probe_layer_shapes
    from pcpp_runtime.models.plans import plan_for

    from .model import build_unet, make_inputs

    unet = build_unet(model, meta=True)
    plan = plan_for(unet)
    inputs = make_inputs(model, latent, device="meta")
    shapes = probe_layer_shapes(
        unet, plan, inputs.latents, torch.tensor(500, device="meta"), inputs.encoder_hidden_states,
        added_cond_kwargs=inputs.added_cond_kwargs,
    )
    if cache is not None:
        cache[key] = (plan, shapes)
    return plan, shapes


def formula_bytes(
    model: str,
    latent: int,
    world: int,
    policy: str,
    portion: float = 0.3,
    *,
    steps: int = 20,
    warmup: int = 4,
    batch: int = 1,
    element_size: int = 4,
    cfg_split: bool = False,
    cache: dict | None = None,
) -> list[dict[str, Any]]:
    """Per rank: bytes received at a synchronous and at a displaced step, by kind, and the
    number of blocking exchanges of a synchronous step (``world`` strips of one latent; with
    ``cfg_split`` every strip rank also receives the other guidance group's output strips)."""
    from pcpp_runtime import ParallelConfig
    from pcpp_runtime.formulas import expected_bytes_per_step
    from pcpp_runtime.partition import make_partitioner

    plan, shapes = _probe(model, latent, cache)
    patch = make_partitioner("rows").plan(latent, latent, world, plan.alignment)
    config = ParallelConfig(policy=policy, portion=portion, warmup_steps=max(1, warmup))
    exchanges = sum(1 for s in shapes if s["kind"] in ("halo_conv", "group_norm", "self_attention"))
    out = []
    first_displaced = next((s for s in range(steps) if s >= warmup and not config.make_policy().synchronous(s, steps)), None)
    for rank in range(world):
        sync = expected_bytes_per_step(shapes, patch, plan, config, rank, 0, steps, True, batch, element_size)
        disp = (
            expected_bytes_per_step(shapes, patch, plan, config, rank, first_displaced, steps, False, batch, element_size)
            if first_displaced is not None
            else dict(sync)
        )
        if cfg_split:  # the other group's whole output
            extra = batch * plan.output_channels * latent * latent * element_size
            for table in (sync, disp):
                table["output"] += extra
                table["total"] += extra
        # bytes of each blocking exchange of a synchronous step (one layer each), for links whose
        # bucket refills while the rank computes between exchanges (tbf)
        layers = []
        for entry in shapes:
            if entry["kind"] in ("halo_conv", "group_norm", "self_attention"):
                one = expected_bytes_per_step([entry], patch, plan, config, rank, 0, steps, True, batch, element_size)
                layers.append(one["total"] - one["output"])
        out.append({"rank": rank, "sync": dict(sync), "displaced": dict(disp), "sync_exchanges": exchanges,
                    "sync_layer_bytes": layers})
    return out


# ---------------------------------------------------------------------- the model
def step_times(c_sync: float, c_disp: float, rank_bytes: dict[str, Any], link: Link) -> tuple[float, float]:
    """(synchronous, displaced) step time of one rank."""
    bw = link.bytes_per_s
    sync, disp = rank_bytes["sync"], rank_bytes["displaced"]
    exchanges = rank_bytes["sync_exchanges"]
    layers = rank_bytes.get("sync_layer_bytes")
    if link.burst_bytes and layers:
        # a token bucket refills while the rank computes between two blocking exchanges, so each
        # exchange goes out at once up to what the bucket holds then
        free = min(link.burst_bytes, bw * c_sync / max(1, exchanges))
        context = sum(max(0.0, b - free) for b in layers) / bw
    else:
        context = (sync["total"] - sync["output"]) / bw
    t_sync = c_sync + context + sync["output"] / bw + exchanges * link.latency_s
    t_disp = max(c_disp, (disp["total"] - disp["output"]) / bw) + disp["output"] / bw + link.latency_s
    return t_sync, t_disp


def generation_time(
    c_sync: float,
    c_disp: float,
    ranks: Sequence[dict[str, Any]],
    link: Link,
    steps: int,
    warmup: int,
    synchronous_policy: bool = False,
) -> dict[str, float]:
    """Predicted seconds of a generation: the slowest rank's sum of step times."""
    worst = None
    for rank_bytes in ranks:
        t_sync, t_disp = step_times(c_sync, c_disp, rank_bytes, link)
        if synchronous_policy:
            total = steps * t_sync
        else:
            w = min(warmup, steps)
            first_stale = (rank_bytes["displaced"]["total"] - rank_bytes["displaced"]["output"]) / link.bytes_per_s
            total = w * t_sync + (first_stale if steps > w else 0.0) + (steps - w) * t_disp
        if worst is None or total > worst["seconds"]:
            worst = {"seconds": total, "sync_step": t_sync, "displaced_step": t_disp, "rank": rank_bytes["rank"]}
    assert worst is not None
    return worst


# ---------------------------------------------------------------------- calibration and checks
def measured_compute(record: dict[str, Any]) -> tuple[float, float]:
    """(C_sync, C_disp) of a measured point: median warm-up and displaced step times (slowest rank)."""
    steps = record["step_seconds"]
    w = record["warmup_steps"]
    sync = steps[:w] if record["policy"] != "sync" else steps
    disp = steps[w:] if record["policy"] != "sync" else steps
    c_sync = statistics.median(sync[1:] if len(sync) > 1 else sync)  # the first step also registers buffers
    c_disp = statistics.median(disp) if disp else c_sync
    return c_sync, c_disp


def predict_point(calibration: dict[str, Any], link: Link, cache: dict | None = None) -> dict[str, Any]:
    """Predict a point on ``link`` from the same point measured on a fast link."""
    c_sync, c_disp = measured_compute(calibration)
    ranks = formula_bytes(
        calibration["model"], calibration["latent"], calibration["world_size"], calibration["policy"],
        calibration["portion"], steps=calibration["steps"], warmup=calibration["warmup_steps"], cache=cache,
    )
    prediction = generation_time(
        c_sync, c_disp, ranks, link, calibration["steps"], calibration["warmup_steps"], calibration["policy"] == "sync"
    )
    prediction.update(c_sync=c_sync, c_disp=c_disp, link=link.name, bytes_per_s=link.bytes_per_s)
    return prediction


def check_throttled(results: dict[str, Any], cache: dict | None = None) -> list[dict[str, Any]]:
    """For every throttled point: the model's prediction (calibrated on the unthrottled veth run
    of the same point, else the loopback run) against the measurement."""
    calibrations: dict[tuple, dict[str, Any]] = {}
    for record in results.get("points", []) + results.get("throttled", []):
        if record.get("kind") != "parallel" or record["link"] not in ("loopback", "veth"):
            continue
        key = (record["latent"], record["world_size"], record["label"], record["transport"])
        if record["link"] == "veth" or key not in calibrations:
            calibrations[key] = record
    rows = []
    for record in results.get("throttled", []):
        if record["link"] in ("veth", "loopback") or record.get("kind") != "parallel":
            continue
        key = (record["latent"], record["world_size"], record["label"], record["transport"])
        calibration = calibrations.get(key)
        if calibration is None:
            continue
        prediction = predict_point(calibration, tbf_link(record["link"]), cache)
        seconds = prediction["seconds"]
        rows.append({
            "latent": record["latent"],
            "world_size": record["world_size"],
            "label": record["label"],
            "transport": record["transport"],
            "link": record["link"],
            "calibrated_on": calibration["link"],
            "c_sync": prediction["c_sync"],
            "c_disp": prediction["c_disp"],
            "predicted_seconds": seconds,
            "measured_seconds": record["seconds"],
            "error_pct": 100.0 * (seconds / record["seconds"] - 1.0),
            "predicted_speedup": record["baseline_seconds"] / seconds,
            "measured_speedup": record["speedup"],
        })
    return rows


# ---------------------------------------------------------------------- GPUs
def _policy_key(policy: str, portion: float) -> str:
    return f"partial({portion:g})" if policy == "partial" else policy


def gpu_compute(
    times: GpuTimes, compute: str, strips: int, batch: int, policy: str, portion: float = 0.3,
    step_time_s: float | None = None,
) -> tuple[float, float, float]:
    """(one GPU's step with the guidance batch of 2, ``C_sync``, ``C_disp``) in seconds for
    ``strips`` strips of a ``batch``: measured per strip (``times.strip_times[compute]``), or a
    one-GPU step divided by the GPUs sharing it (``step_time_s``, or
    ``times.published_step_times[compute]``)."""
    if step_time_s is None and compute in times.strip_times:
        table = times.strip_times[compute]["ms"]
        if batch not in table or strips not in table[batch]:
            raise ValueError(f"{compute}: no measured strip time for batch {batch} in {strips} strips "
                             f"(measured: batches {sorted(table)}, strips {sorted(table[2])})")
        times = table[batch][strips]
        key = _policy_key(policy, portion)
        if key not in times:
            raise ValueError(f"{compute}: no measured displaced step for {key} (measured: {', '.join(sorted(times))}); "
                             "give a one-GPU step time (ideal scaling) instead")
        return table[2][1]["stock"] / 1e3, times["sync"] / 1e3, times[key] / 1e3
    if step_time_s is None:
        if compute not in times.published_step_times:
            raise ValueError(f"unknown GPU compute {compute!r}; choose from {', '.join(times.names()) or 'none (no strip times file)'}")
        step_time_s = times.published_step_times[compute]["seconds"]
    share = step_time_s / (strips * (2 // batch))  # GPUs sharing the step: strips x CFG groups
    return step_time_s, share, share


def gpu_compute_source(times: GpuTimes, compute: str, step_time_s: float | None = None) -> str:
    """One line saying where :func:`predict_gpus`'s compute comes from."""
    if step_time_s is not None:
        return f"one GPU {step_time_s * 1e3:.1f} ms/step (given), divided by the GPUs: ideal scaling, an upper bound"
    if compute in times.strip_times:
        m = times.strip_times[compute]
        return (f"compute per strip measured on {m['card']} ({m['source']}); one GPU "
                f"{m['ms'][2][1]['stock']:.1f} ms/step; link transfers modelled")
    p = times.published_step_times[compute]
    return (f"one GPU {p['seconds'] * 1e3:.1f} ms/step ({p['source']}), divided by the GPUs: ideal scaling, "
            "an upper bound")


def predict_gpus(
    times: GpuTimes,
    gpus: Sequence[int] = (4, 8),
    links: Sequence[str] = ("nvlink4", "100gbe"),
    policies: Sequence[tuple[str, float]] = (("full", 0.3), ("partial", 0.3)),
    *,
    compute: str = "h100",
    step_time_s: float | None = None,
    fixed_s: float = 0.0,
    latent: int = 128,
    steps: int = 50,
    warmup: int = 4,
    cfg_parallel: bool = True,
    element_size: int = 2,
    cache: dict | None = None,
) -> list[dict[str, Any]]:
    """Predicted SDXL speed-ups at ``8 * latent`` pixels on N GPUs.

    With ``cfg_parallel`` (DistriFusion's default) the two halves of the guidance batch go to two
    groups of N/2 GPUs, each splitting its half (batch 1) into N/2 strips; otherwise all N GPUs
    split the batch of 2. Compute per strip (:func:`gpu_compute` on ``times``): measured on ``compute``'s card
    for that batch and strip height, or ``step_time_s`` (a one-GPU step) divided by N; plus
    ``fixed_s``. The baseline is one GPU running the batch of 2 on the whole latent.
    """
    rows = []
    for n in gpus:
        strips = n // 2 if cfg_parallel else n
        batch = 1 if cfg_parallel else 2
        for link_name in links:
            link = LINKS[link_name]
            for policy, portion in policies:
                c1, c_sync, c_disp = gpu_compute(times, compute, strips, batch, policy, portion, step_time_s)
                c_sync, c_disp = c_sync + fixed_s, c_disp + fixed_s
                ranks = formula_bytes("sdxl", latent, strips, policy, portion, steps=steps, warmup=warmup, batch=batch,
                                      element_size=element_size, cfg_split=cfg_parallel, cache=cache)
                t = generation_time(c_sync, c_disp, ranks, link, steps, warmup, policy == "sync")
                worst = max(ranks, key=lambda r: r["displaced"]["total"])
                rows.append({
                    "gpus": n,
                    "layout": f"2 CFG groups x {strips} strips" if cfg_parallel else f"{strips} strips",
                    "link": link.name,
                    "policy": _policy_key(policy, portion),
                    "compute": "given step time" if step_time_s is not None else compute,
                    "received_per_step_max": worst["displaced"]["total"],
                    "received_per_step_sync": worst["sync"]["total"],
                    "compute_sync_step": c_sync,
                    "compute_per_step": c_disp,
                    "transfer_per_step": (worst["displaced"]["total"] - worst["displaced"]["output"]) / link.bytes_per_s,
                    "displaced_step": t["displaced_step"],
                    "sync_step": t["sync_step"],
                    "seconds": t["seconds"],
                    "one_gpu_seconds": steps * c1,
                    "speedup": steps * c1 / t["seconds"],
                })
    return rows
