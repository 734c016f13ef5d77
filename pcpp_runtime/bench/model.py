"""The benchmark model, its sampler and its inputs.

``bench`` is an SDXL-architecture ``UNet2DConditionModel`` with random weights from
``torch.manual_seed(0)``: the same three-level layout as SDXL's UNet (a plain down block, two
cross-attention down blocks and their mirror images going up), linear projections in the
transformer blocks and SDXL's ``text_time`` added conditioning, with narrow channels so that
it runs on a CPU core (24.06 M parameters). ``tiny`` is the same layout, narrower and shallower,
for ``make test``. ``sdxl`` is the real SDXL base UNet's configuration (2.57 G parameters); it
is only ever built on the meta device, to count bytes per step (no weights are downloaded).

The sampler is a plain DDIM loop with SDXL's scheduler settings, called on the bare UNet with
fixed random conditioning: batch 1, no classifier-free guidance, float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = [
    "MODELS",
    "SCHEDULER_CONFIG",
    "BenchModel",
    "BenchInputs",
    "build_unet",
    "make_inputs",
    "make_scheduler",
    "denoise",
    "parameter_count",
]

_SDXL_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    norm_num_groups=32,
    addition_embed_type="text_time",
)


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A named UNet configuration and the defaults the benchmark runs it with."""

    name: str
    config: dict[str, Any]
    latent_sizes: tuple[int, ...]  # default grid of square latent sizes
    steps: int
    warmup_steps: int
    description: str

    @property
    def text_embeds_dim(self) -> int:
        """SDXL's pooled text embedding width: projection input minus 6 time ids' embeddings."""
        c = self.config
        return int(c["projection_class_embeddings_input_dim"]) - 6 * int(c["addition_time_embed_dim"])


MODELS: dict[str, BenchModel] = {
    "bench": BenchModel(
        name="bench",
        config=dict(
            _SDXL_LAYOUT,
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            transformer_layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        ),
        latent_sizes=(64, 128),
        steps=20,
        warmup_steps=4,
        description="SDXL-architecture UNet, block_out_channels (64, 128, 256), random weights (seed 0), 24.06 M parameters",
    ),
    "tiny": BenchModel(
        name="tiny",
        config=dict(
            _SDXL_LAYOUT,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            transformer_layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=32,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64,
        ),
        latent_sizes=(32,),
        steps=4,
        warmup_steps=2,
        description="the benchmark model's layout, narrow and shallow (for make test)",
    ),
    "sdxl": BenchModel(
        name="sdxl",
        config=dict(
            _SDXL_LAYOUT,
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        latent_sizes=(128,),
        steps=50,
        warmup_steps=4,
        description="stabilityai/stable-diffusion-xl-base-1.0's UNet configuration (meta device only: byte counts)",
    ),
}

#: SDXL base 1.0's scheduler settings (its scheduler_config.json), as a DDIM scheduler
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)


def _model(name: str) -> BenchModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark model {name!r}; choose one of: {', '.join(MODELS)}") from None


def build_unet(name: str = "bench", *, meta: bool = False, seed: int = 0):
    """The named UNet: random weights from ``torch.manual_seed(seed)``, eval mode, float32.
    ``meta=True`` builds it on the meta device (shapes only, no memory, no weights)."""
    import torch
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    spec = _model(name)
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**spec.config).eval()
    torch.manual_seed(seed)
    return UNet2DConditionModel(**spec.config).eval()


def parameter_count(unet) -> int:
    return sum(p.numel() for p in unet.parameters())


def make_scheduler(steps: int):
    """A DDIM scheduler with SDXL's settings, set to ``steps`` steps."""
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler


@dataclasses.dataclass
class BenchInputs:
    """The starting latent and the fixed conditioning of one generation."""

    latents: Any  # (B, 4, H, W)
    encoder_hidden_states: Any  # (B, 77, cross_attention_dim)
    added_cond_kwargs: dict[str, Any]  # text_embeds (B, D), time_ids (B, 6)


def make_inputs(name: str, latent_size: int, seed: int = 0, *, batch: int = 1, device: str = "cpu") -> BenchInputs:
    """Latents from ``seed``; random text conditioning from ``seed + 1``; SDXL's time ids for a
    ``8 * latent_size`` pixel square (original size, crop origin, target size)."""
    import torch

    spec = _model(name)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    latents = torch.randn(batch, spec.config["in_channels"], latent_size, latent_size, generator=gen)
    cond = torch.Generator(device="cpu").manual_seed(seed + 1)
    hidden = torch.randn(batch, 77, spec.config["cross_attention_dim"], generator=cond)
    text_embeds = torch.randn(batch, spec.text_embeds_dim, generator=cond)
    pixels = float(8 * latent_size)
    time_ids = torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * batch)
    return BenchInputs(
        latents=latents.to(device),
        encoder_hidden_states=hidden.to(device),
        added_cond_kwargs={"text_embeds": text_embeds.to(device), "time_ids": time_ids.to(device)},
    )


def denoise(
    denoiser: Callable[..., Any],
    scheduler,
    inputs: BenchInputs,
    *,
    on_step: Callable[[int, float], None] | None = None,
):
    """Run the DDIM loop with ``denoiser`` (the UNet or a ParallelDenoiser around it); returns
    the final latent. ``on_step(i, seconds)`` is called after each step with its duration."""
    import time

    import torch

    latents = inputs.latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            start = time.perf_counter()
            model_input = scheduler.scale_model_input(latents, t)
            noise = denoiser(
                model_input,
                t,
                encoder_hidden_states=inputs.encoder_hidden_states,
                added_cond_kwargs=inputs.added_cond_kwargs,
                return_dict=False,
            )[0]
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i, time.perf_counter() - start)
    return latents
