"""One text-to-image job: load a pipeline, split its denoiser, generate, report.

:func:`run_rank` is what every rank does, whatever started it (threads of ``--transport local``
or one process per rank under a launcher). Rank 0 gathers the other ranks' statistics over the
transport's object path (msgpack), decodes the image and writes the report.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from .config import ParallelConfig
from .partition import ShapeError
from .transports.base import Transport

__all__ = [
    "JobSpec",
    "SCHEDULERS",
    "check_shape",
    "class_label",
    "denoiser_of",
    "load_pipeline",
    "psnr",
    "resolve_model",
    "run_rank",
    "vae_factor",
]

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


def resolve_model(model: str) -> str:
    """A built-in name (``tiny-sd``) becomes its local folder; anything else is passed to
    ``from_pretrained`` as given (a hub id or a folder)."""
    from .models.tiny import builtin_model_path, builtin_names

    if model in builtin_names():
        return str(builtin_model_path(model))
    return model


def load_pipeline(model: str, scheduler: str | None = None, device: str | torch.device = "cpu", dtype=torch.float32):
    """Load a diffusers pipeline through ``from_pretrained`` and set its scheduler.

    A folder whose ``model_index.json`` names this project's own UNet class (the ``demo`` model's
    :class:`~pcpp_runtime.models.positional_unet.PositionalUNet2DConditionModel`) loads because its
    module is imported here first: diffusers loads components only from modules already imported.
    """
    import diffusers

    from .models import positional_unet  # noqa: F401 -- makes the class loadable by name

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


def denoiser_of(pipe) -> torch.nn.Module:
    """The module a pipeline calls once per step: its ``unet``, or its ``transformer`` (DiT,
    PixArt). Accepts a :class:`~pcpp_runtime.parallel.ParallelPipeline` too."""
    pipe = getattr(pipe, "pipeline", pipe)
    denoiser = getattr(pipe, "unet", None)
    if denoiser is None:
        denoiser = getattr(pipe, "transformer", None)
    if denoiser is None:
        raise TypeError(f"{type(pipe).__name__} has neither a unet nor a transformer")
    return denoiser


def vae_factor(pipe) -> int:
    """Pixels per latent row: the pipeline's ``vae_scale_factor``, or (DiT's pipeline has none)
    the VAE's, ``2 ** (blocks - 1)``."""
    factor = getattr(pipe, "vae_scale_factor", None)
    return int(factor) if factor else 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _call_parameters(pipe) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(getattr(pipe, "pipeline", pipe).__call__).parameters)


def default_size(pipe) -> tuple[int, int]:
    size = denoiser_of(pipe).config.sample_size
    height, width = (size, size) if isinstance(size, int) else (size[0], size[1])
    factor = vae_factor(pipe)
    return height * factor, width * factor


def check_shape(pipe, height: int, width: int, world_size: int, config: ParallelConfig) -> None:
    """Refuse an image size the job cannot split, in pixels, before any compute."""
    from .models import plan_for
    from .partition import make_partitioner

    config.check_world_size(world_size)
    if "height" not in _call_parameters(pipe) and (height, width) != default_size(pipe):
        native = default_size(pipe)
        raise ShapeError(
            f"{type(pipe).__name__} generates only its native {native[1]}x{native[0]} px (the model's sample "
            f"size); got {width}x{height} px (width x height): leave out --height/--width"
        )
    factor = vae_factor(pipe)
    alignment = plan_for(denoiser_of(pipe)).alignment
    step = factor * alignment
    for name, value in (("height", height), ("width", width)):
        if value % step:
            lower = (value // step) * step
            raise ShapeError(
                f"{name} {value} px is not a multiple of {step} px (VAE factor {factor} x the model's "
                f"alignment {alignment}); nearest that work: {lower or step} or {lower + step} px"
            )
    latent_rows = height // factor
    strips = world_size // 2 if config.cfg_split else world_size  # CFG parallel: two groups
    per_strip = "ranks" if not config.cfg_split else "strips per CFG group"
    if latent_rows // alignment < strips:
        most = latent_rows // alignment * (2 if config.cfg_split else 1)
        raise ShapeError(
            f"height {height} px ({latent_rows} latent rows) gives only {latent_rows // alignment} strip(s) of "
            f"{alignment} rows at the model's coarsest level, too few for {strips} {per_strip}: use a height of "
            f"at least {strips * step} px or at most {most} rank(s)"
        )
    make_partitioner(config.partitioner).plan(latent_rows, width // factor, strips, alignment, config.weights)


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
    """Run the pipeline (or a ParallelPipeline) to the final latent, ``(B, C, H/f, W/f)``.

    Text-to-image pipelines (SD, SDXL, PixArt) are called with the prompt and the size;
    PixArt's aspect-ratio binning and caption cleaning (optional packages) are turned off, so
    the latent has exactly the size asked for. Class-conditional pipelines (DiT) get the class
    of :func:`class_label` and their native size.
    """
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    params = _call_parameters(pipe)
    if "class_labels" in params:
        return _call_class_conditional(pipe, spec, generator)
    negative = spec.negative_prompt
    if negative is None and "negative_prompt" in params:
        negative = params["negative_prompt"].default  # PixArt wants "" where SD takes None
    kwargs: dict[str, Any] = {}
    for name in ("use_resolution_binning", "clean_caption"):
        if name in params:
            kwargs[name] = False
    return pipe(
        prompt=spec.prompt,
        negative_prompt=negative,
        height=height,
        width=width,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        generator=generator,
        output_type="latent",
        **kwargs,
    ).images


def class_label(pipe, prompt: str) -> int:
    """The class a prompt names for a class-conditional pipeline (see :class:`JobSpec`)."""
    pipe = getattr(pipe, "pipeline", pipe)
    num_classes = int(denoiser_of(pipe).config.num_embeds_ada_norm)
    text = prompt.strip()
    if text.isdigit():
        if int(text) >= num_classes:
            raise ValueError(f"class {text} is out of range: the model has classes 0 to {num_classes - 1}")
        return int(text)
    labels = getattr(pipe, "labels", None) or {}
    if text in labels:
        return int(labels[text])
    return zlib.crc32(text.encode("utf-8")) % num_classes


def _call_class_conditional(pipe, spec: JobSpec, generator: torch.Generator) -> torch.Tensor:
    """DiT's pipeline has no ``output_type="latent"``: it always decodes. For the call, its VAE's
    ``decode`` is shadowed by one that records the latent and skips decoding; the recorded
    ``latent / scaling_factor`` is scaled back, so this returns what ``output_type="latent"``
    returns elsewhere (the caller decodes it with :func:`decode_image`)."""
    from diffusers.models.autoencoders.vae import DecoderOutput

    vae = getattr(pipe, "pipeline", pipe).vae
    if "decode" in vars(vae):
        raise RuntimeError("the VAE's decode is already patched (offloading hooks?); cannot record the latent")
    recorded: list[torch.Tensor] = []

    def record(latents: torch.Tensor, *args: Any, **kwargs: Any) -> DecoderOutput:
        recorded.append(latents)
        return DecoderOutput(sample=latents)

    vae.decode = record
    try:
        pipe(
            class_labels=[class_label(pipe, spec.prompt)],
            guidance_scale=spec.guidance_scale,
            generator=generator,
            num_inference_steps=spec.steps,
            output_type="pt",
        )
    finally:
        del vae.decode
    return recorded[-1] * vae.config.scaling_factor


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
    processor = getattr(pipe, "image_processor", None)
    if processor is None:  # DiT's pipeline post-processes by hand
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=vae_factor(pipe))
    return processor.postprocess(image, output_type="pil")[0], image


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
