"""One text-to-image job: load a pipeline, split its denoiser, generate, report.

:func:`run_rank` is what every rank does, whatever started it (threads of ``--transport local``
or one process per rank under a launcher). Rank 0 gathers the other ranks' statistics over the
transport's object path (msgpack), decodes the image and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .config import ParallelConfig
from .partition import ShapeError
from .transports.base import Transport

__all__ = ["JobSpec", "SCHEDULERS", "check_shape", "load_pipeline", "psnr", "resolve_model", "run_rank"]

#: short names for ``--scheduler`` -> diffusers class name (any other class name works too)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What to generate; the same on every rank."""

    model: str = "tiny-sd"
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


def resolve_model(model: str) -> str:
    """A built-in name (``tiny-sd``) becomes its local folder; anything else is passed to
    ``from_pretrained`` as given (a hub id or a folder)."""
    from .models.tiny import BUILTIN_MODELS, builtin_model_path

    if model in BUILTIN_MODELS:
        return str(builtin_model_path(model))
    return model


def load_pipeline(model: str, scheduler: str | None = None, device: str | torch.device = "cpu", dtype=torch.float32):
    """Load a diffusers pipeline through ``from_pretrained`` and set its scheduler."""
    import diffusers

    kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    pipe = diffusers.DiffusionPipeline.from_pretrained(resolve_model(model), **kwargs)
    if scheduler is not None:
        class_name = SCHEDULERS.get(scheduler, scheduler)
        cls = getattr(diffusers, class_name, None)
        if cls is None or not class_name.endswith("Scheduler"):
            raise ValueError(
                f"unknown scheduler {scheduler!r}; use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name"
            )
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe.to(device)


def default_size(pipe) -> tuple[int, int]:
    size = pipe.unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return size * pipe.vae_scale_factor, size * pipe.vae_scale_factor


def check_shape(pipe, height: int, width: int, world_size: int, config: ParallelConfig) -> None:
    """Refuse an image size the job cannot split, in pixels, before any compute."""
    from .models import plan_for
    from .partition import make_partitioner

    config.check_world_size(world_size)
    factor = pipe.vae_scale_factor
    alignment = plan_for(pipe.unet).alignment
    step = factor * alignment
    for name, value in (("height", height), ("width", width)):
        if value % step:
            lower = (value // step) * step
            raise ShapeError(
                f"{name} {value} px is not a multiple of {step} px (VAE factor {factor} x the model's "
                f"alignment {alignment}); nearest that work: {lower or step} or {lower + step} px"
            )
    latent_rows = height // factor
    if latent_rows // alignment < world_size:
        raise ShapeError(
            f"height {height} px ({latent_rows} latent rows) gives only {latent_rows // alignment} strip(s) of "
            f"{alignment} rows at the model's coarsest level, too few for {world_size} ranks: use a height of "
            f"at least {world_size * step} px or at most {latent_rows // alignment} rank(s)"
        )
    make_partitioner(config.partitioner).plan(latent_rows, width // factor, world_size, alignment, config.weights)


def psnr(test: torch.Tensor, reference: torch.Tensor, data_range: float | None = None) -> float:
    """PSNR in dB of ``test`` against ``reference`` (``inf`` when identical). ``data_range``
    defaults to the reference's max - min."""
    test = test.double()
    reference = reference.double()
    mse = torch.mean((test - reference) ** 2).item()
    if mse == 0:
        return math.inf
    if data_range is None:
        data_range = (reference.max() - reference.min()).item()
    return 10.0 * math.log10(data_range**2 / mse)


def call_pipeline(pipe, spec: JobSpec, height: int, width: int):
    """Run the pipeline (or a ParallelPipeline) to the final latent, ``(B, C, H/f, W/f)``."""
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    return pipe(
        spec.prompt,
        negative_prompt=spec.negative_prompt,
        height=height,
        width=width,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        generator=generator,
        output_type="latent",
    ).images


def run_rank(pipe, transport: Transport, spec: JobSpec, config: ParallelConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate on this rank; returns the final latent and this rank's statistics."""
    from .parallel import parallelize

    height, width = spec.height or default_size(pipe)[0], spec.width or default_size(pipe)[1]
    check_shape(pipe, height, width, transport.world_size, config)
    pipe.set_progress_bar_config(disable=transport.rank != 0, desc=f"denoising ({transport.world_size} worker(s))")
    parallel = parallelize(pipe, transport, config)
    start = time.perf_counter()
    latents = call_pipeline(parallel, spec, height, width)
    seconds = time.perf_counter() - start
    runtime = parallel.runtime
    after = range(min(config.warmup_steps, runtime.num_steps), runtime.num_steps)
    stats = {
        "rank": transport.rank,
        "denoise_seconds": seconds,
        "denoiser_calls": runtime.num_steps,
        "received_per_step": runtime.ledger.per_step_mean(after, "received"),
        "sent_per_step": runtime.ledger.per_step_mean(after, "sent"),
        "engine_bytes_received": runtime.ledger.total("received"),
        "engine_bytes_sent": runtime.ledger.total("sent"),
        "transport_counters": transport.counters.snapshot(),
        "stale_buffer_bytes": parallel.denoiser.stale_buffer_bytes(),
        "peak_rss_bytes": _peak_rss(),
    }
    return latents, stats


def gather_stats(transport: Transport, stats: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Every rank's statistics on rank 0 (``None`` elsewhere), over the object path."""
    if transport.rank != 0:
        transport.send_object(stats, 0)
        return None
    return [stats] + [transport.recv_object(peer) for peer in range(1, transport.world_size)]


def decode_image(pipe, latents: torch.Tensor):
    """The PIL image of the first latent in the batch."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0], image


def write_atomically(path: str | os.PathLike, write) -> None:
    """Write through a temporary file and rename, so no partial file stands as complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    write(staging)
    staging.replace(target)


def _peak_rss() -> int:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return 0
