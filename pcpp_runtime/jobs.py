"""The job API: one text-to-image generation with its denoiser split over N ranks.

    from pcpp_runtime import ParallelConfig
    from pcpp_runtime.jobs import JobSpec, Threads, run

    result = run(JobSpec(model="tiny-sd", prompt="a red circle", steps=20),
                 ParallelConfig(policy="partial", portion=0.3), Threads(2), compare=True)
    result.write(output="out.png", report="report.json")
    print(result.summary())

:func:`run` loads the pipeline on every rank, checks that the image size splits over the ranks
(before any rank waits on another), connects the transport, generates, and gathers every
rank's statistics on rank 0, which decodes the image and returns a :class:`JobResult`; other
ranks return ``None``. ``ranks`` is :class:`Threads` (threads of this process),
:class:`Launched` (this process is one rank a launcher started) or a connected transport
(:mod:`pcpp_runtime.ranks`). ``pcpp generate``, the policy grid and the README's examples all
run through it.

:meth:`JobResult.to_json` is the report ``pcpp generate --report`` writes; its ``schema`` key
is :data:`SCHEMA_VERSION`, and ``pcpp_runtime/report.schema.json`` describes every key.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .accounting import peak_rss_bytes
from .config import ParallelConfig
from .metrics import compare_latents, finite_or_none, psnr
from .ranks import Launched, Ranks, RankPlace, Threads, run_on_ranks
from .transports.base import Transport

__all__ = [
    "SCHEMA_VERSION",
    "Comparison",
    "JobResult",
    "JobSpec",
    "Launched",
    "RankStats",
    "Threads",
    "run",
]

#: version of the report :meth:`JobResult.to_json` writes (its ``schema`` key); raised when a key
#: changes meaning or goes away, not when one is added
SCHEMA_VERSION = 1

#: where the JSON Schema of the report lies
REPORT_SCHEMA_PATH = Path(__file__).resolve().parent / "report.schema.json"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What to generate; the same on every rank.

    For a class-conditional pipeline (DiT) the prompt names the class: an integer is the class
    id, a label the pipeline knows (``pipe.labels``, from the checkpoint's ``id2label``) is its
    id, and any other text maps to ``crc32(prompt) % num_classes`` -- a fixed class per prompt.
    Such pipelines also ignore ``negative_prompt`` and generate only their native size.
    """

    model: str = "demo"
    prompt: str = "a red circle at the top left and a blue square at the bottom"
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    steps: int = 20
    scheduler: str | None = None
    guidance_scale: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {value}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RankStats:
    """One rank's figures for one generation (sent to rank 0 over the object path).

    Bytes per step are means over the steps after warm-up, by layer kind (``attention_kv``,
    ``halo``, ``norm``, ``output``) plus ``total``; ``engine_bytes_*`` are the whole run's as the
    engine posted them and ``transport_counters`` what the transport itself counted.
    """

    rank: int
    denoise_seconds: float
    denoiser_calls: int
    received_per_step: dict[str, float]
    sent_per_step: dict[str, float]
    engine_bytes_received: int
    engine_bytes_sent: int
    transport_counters: dict[str, int]
    stale_buffer_bytes: dict[str, int]
    peak_rss_bytes: int

    @classmethod
    def collect(cls, parallel: Any, transport: Transport, seconds: float, warmup_steps: int) -> RankStats:
        """The figures of a generation that just ran through ``parallel`` (a
        :class:`~pcpp_runtime.parallel.ParallelPipeline` or ``ParallelDenoiser``)."""
        denoiser = getattr(parallel, "denoiser", parallel)
        runtime = denoiser.runtime
        after = range(min(warmup_steps, runtime.num_steps), runtime.num_steps)
        return cls(
            rank=transport.rank,
            denoise_seconds=seconds,
            denoiser_calls=runtime.num_steps,
            received_per_step=runtime.ledger.per_step_mean(after, "received"),
            sent_per_step=runtime.ledger.per_step_mean(after, "sent"),
            engine_bytes_received=runtime.ledger.total("received"),
            engine_bytes_sent=runtime.ledger.total("sent"),
            transport_counters=transport.counters.snapshot(),
            stale_buffer_bytes=denoiser.stale_buffer_bytes(),
            peak_rss_bytes=peak_rss_bytes(),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankStats:
        return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The job against one worker with the same seed (``compare=True``)."""

    psnr_db: float | None  # final latent, range of the reference; None when identical
    identical: bool
    max_abs_diff: float
    image_psnr_db: float | None  # decoded images in [0, 1]
    baseline_seconds: float
    speedup: float


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What rank 0 returns: the final latent ``(B, C, H/f, W/f)``, the decoded image of its
    first sample (as a PIL image and as pixels), every rank's :class:`RankStats` and, with
    ``compare=True``, a :class:`Comparison` with one worker."""

    spec: JobSpec
    config: ParallelConfig
    transport: str
    scheduler: str
    height: int
    width: int
    ranks: list[RankStats]
    latents: torch.Tensor = dataclasses.field(repr=False)
    image: Any = dataclasses.field(repr=False)  # PIL.Image.Image
    pixels: torch.Tensor = dataclasses.field(repr=False)  # the same image, (3, H, W) in [0, 1], float32
    comparison: Comparison | None = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def denoise_seconds(self) -> float:
        """The slowest rank's denoising time."""
        return max(r.denoise_seconds for r in self.ranks)

    def to_json(self) -> dict[str, Any]:
        """The report: the job, the slowest rank's time, bytes and memory per rank, and the
        comparison with one worker when there is one (keys in ``report.schema.json``)."""
        report: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "model": self.spec.model,
            "prompt": self.spec.prompt,
            "seed": self.spec.seed,
            "scheduler": self.scheduler,
            "guidance_scale": self.spec.guidance_scale,
            "world_size": self.world_size,
            "policy": self.config.policy,
            "portion": self.config.portion,
            "warmup_steps": self.config.warmup_steps,
            "partitioner": self.config.partitioner,
            "cfg_parallel": self.config.cfg_split,
            "transport": self.transport,
            "steps": self.spec.steps,
            "denoiser_calls": self.ranks[0].denoiser_calls,
            "height": self.height,
            "width": self.width,
            "denoise_seconds": self.denoise_seconds,
            "denoise_seconds_per_rank": [r.denoise_seconds for r in self.ranks],
            "bytes_received_per_step": [r.received_per_step["total"] for r in self.ranks],
            "bytes_sent_per_step": [r.sent_per_step["total"] for r in self.ranks],
            "bytes_received_per_step_by_kind": [
                {kind: value for kind, value in r.received_per_step.items() if kind != "total"} for r in self.ranks
            ],
            "transport_bytes_received": [r.transport_counters["payload_received"] for r in self.ranks],
            "engine_bytes_received": [r.engine_bytes_received for r in self.ranks],
            "stale_buffer_bytes": [sum(r.stale_buffer_bytes.values()) for r in self.ranks],
            "peak_rss_bytes": [r.peak_rss_bytes for r in self.ranks],
        }
        if self.comparison is not None:
            report.update(dataclasses.asdict(self.comparison))
        return report

    def write(self, output: str | Path | None = None, report: str | Path | None = None) -> None:
        """The PNG to ``output`` and the JSON report to ``report`` (each written whole or not at all)."""
        from .files import write_atomically, write_json

        if output:
            write_atomically(output, lambda path: self.image.save(path, format="PNG"))
        if report:
            write_json(report, self.to_json())

    def summary(self) -> str:
        """A few lines for a person: workers, policy, time, bytes and the comparison."""
        config = self.config
        mb = ", ".join(f"{r.received_per_step['total'] / 1e6:.3f}" for r in self.ranks)
        lines = [
            f"{self.world_size} worker(s) over {self.transport}, policy {config.policy}"
            + (f" (portion {config.portion})" if config.policy == "partial" else "")
            + f", {self.spec.steps} steps ({config.warmup_steps} warm-up), {self.width}x{self.height} px",
            f"  denoising: {self.denoise_seconds:.2f} s (slowest rank)",
            f"  received per step after warm-up: {mb} MB (by rank)",
        ]
        c = self.comparison
        if c is not None:
            quality = "identical" if c.identical else f"{c.psnr_db:.2f} dB"
            lines.append(
                f"  vs one worker: latent PSNR {quality}, max |diff| {c.max_abs_diff:.2e}, "
                f"speed-up {c.speedup:.2f}x ({c.baseline_seconds:.2f} s for one worker)"
            )
        return "\n".join(lines)


def run(
    spec: JobSpec,
    config: ParallelConfig,
    ranks: Ranks,
    *,
    compare: bool = False,
    pipelines: list | None = None,
    device: str | None = None,
    progress: bool = True,
) -> JobResult | None:
    """Generate ``spec`` with the denoiser split over ``ranks`` as ``config`` says.

    Args:
        spec: what to generate (the same on every rank).
        config: how to split and condition the denoiser.
        ranks: :class:`Threads`, :class:`Launched` or a connected transport.
        compare: rank 0 also generates with one worker (same seed, the same pipeline without
            the split) and reports the difference and the speed-up.
        pipelines: pipelines already loaded, one per rank of this process (a list of one for
            a launched rank or a held transport), instead of loading ``spec.model``; they are
            returned unwrapped, so they can be used again.
        device: where to compute (default: the CPU, or under a launcher the local rank's GPU).
        progress: rank 0 shows a progress bar per generation.

    Returns rank 0's :class:`JobResult`, ``None`` on other ranks. Raises before any rank waits
    on another for a bad shape or model (:class:`~pcpp_runtime.partition.ShapeError`,
    :class:`~pcpp_runtime.config.ConfigError`, ``ValueError``, ``KeyError``,
    ``FileNotFoundError``); :class:`~pcpp_runtime.ranks.RankFailed` names a rank that could not
    connect or failed while generating.
    """
    from .config import check_cuda_graphs
    from .parallel import parallelize
    from .pipelines import call_pipeline, check_shape, decode_image, image_size, load_pipeline

    check_cuda_graphs(config.cuda_graphs, torch.cuda.is_available())

    def prepare(place: RankPlace):
        if pipelines is not None:
            pipe = pipelines[place.rank if isinstance(ranks, Threads) else 0]
        else:
            pipe = load_pipeline(spec.model, spec.scheduler, device=place.device)
        check_shape(pipe, *image_size(pipe, spec), place.world_size, config)
        return pipe

    def work(pipe, transport: Transport):
        pipe.set_progress_bar_config(
            disable=not progress or transport.rank != 0, desc=f"denoising ({transport.world_size} worker(s))"
        )
        parallel = parallelize(pipe, transport, config)
        try:
            start = time.perf_counter()
            latents = call_pipeline(parallel, spec, *image_size(pipe, spec))
            seconds = time.perf_counter() - start
            stats = RankStats.collect(parallel, transport, seconds, config.warmup_steps)
        finally:
            parallel.denoiser.remove()
        return (pipe, latents), stats.to_dict()

    if pipelines is not None:
        expected = ranks.count if isinstance(ranks, Threads) else 1
        if len(pipelines) != expected:
            raise ValueError(f"pipelines: {expected} pipeline(s) needed here (one per rank of this process), got {len(pipelines)}")
    gathered = run_on_ranks(ranks, config, prepare, work, device=device)
    if gathered is None:
        return None
    pipe, latents = gathered.value
    rank_stats = [RankStats.from_dict(stats) for stats in gathered.stats]
    height, width = image_size(pipe, spec)
    image, pixels = decode_image(pipe, latents)
    pixels = _unit_range(pixels[0])
    comparison = None
    if compare:
        pipe.set_progress_bar_config(disable=not progress, desc="denoising (1 worker, reference)")
        start = time.perf_counter()
        reference = call_pipeline(pipe, spec, height, width)
        seconds = time.perf_counter() - start
        _, reference_pixels = decode_image(pipe, reference)
        latent = compare_latents(latents, reference)
        comparison = Comparison(
            psnr_db=latent.psnr_db,
            identical=latent.identical,
            max_abs_diff=latent.max_abs_diff,
            image_psnr_db=finite_or_none(psnr(pixels, _unit_range(reference_pixels[0]), 1.0)),
            baseline_seconds=seconds,
            speedup=seconds / max(s.denoise_seconds for s in rank_stats),
        )
    return JobResult(
        spec=spec,
        config=config,
        transport=_transport_name(ranks),
        scheduler=type(pipe.scheduler).__name__,
        height=height,
        width=width,
        ranks=rank_stats,
        latents=latents,
        image=image,
        pixels=pixels,
        comparison=comparison,
    )


def _unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in [-1, 1] as an image in [0, 1], float32."""
    return (pixels.float() / 2 + 0.5).clamp(0, 1)


def _transport_name(ranks: Ranks) -> str:
    if isinstance(ranks, Threads):
        return "local"
    if isinstance(ranks, Launched):
        return ranks.transport
    return ranks.name
