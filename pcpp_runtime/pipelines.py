"""Diffusers pipelines as a job uses them: load, size, check, call, decode.

Everything here works on a plain pipeline or a :class:`~pcpp_runtime.parallel.ParallelPipeline`
and runs on one rank; nothing here talks to other ranks. A model string is a built-in name
(:mod:`pcpp_runtime.models.builtin`), a hub id or a local diffusers folder, and always loads
through ``from_pretrained``.
"""

from __future__ import annotations

import inspect
import zlib
from typing import TYPE_CHECKING, Any

import torch

from .config import ParallelConfig
from .partition import check_splittable

if TYPE_CHECKING:
    from .jobs import JobSpec

__all__ = [
    "SCHEDULERS",
    "call_pipeline",
    "check_shape",
    "class_label",
    "decode_image",
    "default_size",
    "denoiser_of",
    "image_size",
    "load_pipeline",
    "load_pipelines",
    "resolve_model",
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


def resolve_model(model: str) -> str:
    """A built-in name (``tiny-sd``) becomes its local folder; anything else is passed to
    ``from_pretrained`` as given (a hub id or a folder)."""
    from .models.builtin import builtin_model_path, builtin_names

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


def load_pipelines(model: str, count: int, scheduler: str | None = None, device: str | torch.device = "cpu") -> list:
    """``count`` copies of a pipeline (one per thread rank), progress bars off. Loading is not
    thread-safe, so this runs before the threads start."""
    pipes = [load_pipeline(model, scheduler, device) for _ in range(count)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


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


def image_size(pipe, spec: JobSpec) -> tuple[int, int]:
    """(height, width) in pixels the job asks for: the spec's, or the model's own size."""
    native = default_size(pipe)
    return spec.height or native[0], spec.width or native[1]


def check_shape(pipe, height: int, width: int, world_size: int, config: ParallelConfig) -> None:
    """Refuse an image size the job cannot split, in pixels, before any compute."""
    from .models.plans import plan_for
    from .partition import ShapeError, make_partitioner

    config.check_world_size(world_size)
    if "height" not in _call_parameters(pipe) and (height, width) != default_size(pipe):
        native = default_size(pipe)
        raise ShapeError(
            f"{type(pipe).__name__} generates only its native {native[1]}x{native[0]} px (the model's sample "
            f"size); got {width}x{height} px (width x height): leave out --height/--width"
        )
    factor = vae_factor(pipe)
    alignment = plan_for(denoiser_of(pipe)).alignment
    groups = 2 if config.cfg_split else 1  # CFG parallel: two groups of ranks split the rows
    step_means = f"VAE factor {factor} x the model's alignment {alignment}"
    check_splittable(
        "height", height, factor * alignment, world_size // groups, unit="px", step_means=step_means, ranks_per_strip=groups
    )
    check_splittable("width", width, factor * alignment, 1, unit="px", step_means=step_means)
    make_partitioner(config.partitioner).plan(height // factor, width // factor, world_size // groups, alignment, config.weights)


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


def decode_image(pipe, latents: torch.Tensor):
    """Decode ``latents``: (the PIL image of the first sample, the decoded pixels ``(B, 3, H, W)``
    in [-1, 1])."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    processor = getattr(pipe, "image_processor", None)
    if processor is None:  # DiT's pipeline post-processes by hand
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=vae_factor(pipe))
    return processor.postprocess(image, output_type="pil")[0], image


