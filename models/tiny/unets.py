"""Built-in tiny UNet pipelines: ``tiny-sd``, ``tiny-sd2`` and ``tiny-sdxl``.

Random weights seeded per component (the same on every machine for a given torch version),
character-level CLIP tokenizers (:func:`.tokenizers.write_char_tokenizer`), and
a factor-2 VAE, so a 64 x 64 image has a 32 x 32 latent. Both UNets down-sample twice (strips
align to 4 latent rows).

* ``tiny-sd`` -- ``StableDiffusionPipeline`` shaped like SD 1.x: conv projections, heads of 4
  and 8 channels, a 32-wide CLIP text encoder, DDIM.
* ``tiny-sd2`` -- ``StableDiffusionPipeline`` shaped like SD 2.x: linear projections in the
  transformer blocks, 16-dimensional attention heads (tiny-sd: 4 and 8), ``upcast_attention``,
  a 64-wide CLIP text encoder, a v-prediction DDIM scheduler.
* ``tiny-sdxl`` -- ``StableDiffusionXLPipeline``: two text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``, hidden 32 each, concatenated to a 64-wide context), two
  transformer layers per block at the deepest level, ``addition_embed_type="text_time"``
  (pooled text embedding + size/crop ids, per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "SD_BETAS",
    "build_tiny_sd",
    "build_tiny_sd2",
    "build_tiny_sdxl",
    "clip_text_config",
    "save_pipeline",
    "save_sd_pipeline",
    "sd_ddim_scheduler",
    "seeded",
    "tiny_unet",
    "tiny_vae",
]

T = TypeVar("T")

#: Stable Diffusion's noise schedule (scaled-linear betas from 0.00085 to 0.012), which every
#: tiny model's scheduler uses
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

#: what every tiny UNet shares: a 32 x 32 latent of 4 channels, three levels of 32/64/64 channels
#: (two down-samplings), one resnet per level, 8 groups in every group norm
_UNET_LAYOUT = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=8,
)

#: SD 1.x/2.x's blocks: cross-attention at the two finer levels, none at the deepest
_SD_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def seeded(seed: int, build: Callable[..., T], *args, **kwargs) -> T:
    """``build(*args, **kwargs)`` right after ``torch.manual_seed(seed)``: each component's random
    weights depend on its own seed only, not on what was built before it."""
    import torch

    torch.manual_seed(seed)
    return build(*args, **kwargs)


def save_pipeline(pipe, folder: Path) -> None:
    """Save the diffusers pipeline ``pipe`` to ``folder``, weights as safetensors."""
    pipe.save_pretrained(str(folder), safe_serialization=True)


def tiny_vae(seed: int = 2, **overrides):
    """A factor-2 ``AutoencoderKL`` (two blocks, 16/32 channels, 4 latent channels)."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    return seeded(seed, AutoencoderKL, **(config | overrides))


def tiny_unet(unet_class=None, **config):
    """A UNet (``unet_class``, default ``UNet2DConditionModel``) of the tiny layout -- latent
    ``(B, 4, 32, 32)``, 32/64/64 channels -- with ``config`` on top, weights from seed 0."""
    from diffusers import UNet2DConditionModel

    return seeded(0, unet_class or UNet2DConditionModel, **(_UNET_LAYOUT | config))


def clip_text_config(tokenizer, hidden: int, heads: int = 2, **extra):
    """A 2-layer ``CLIPTextConfig`` of width ``hidden`` (MLP ``2 * hidden``) for ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def sd_ddim_scheduler(**overrides):
    """DDIM with Stable Diffusion's settings (:data:`SD_BETAS`, offset 1)."""
    from diffusers import DDIMScheduler

    config = dict(SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DDIMScheduler(**(config | overrides))


def save_sd_pipeline(folder: Path, unet, text_encoder, tokenizer, scheduler, vae=None) -> None:
    """A ``StableDiffusionPipeline`` (``vae`` or the tiny VAE, no safety checker) saved to
    ``folder`` as safetensors."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae if vae is not None else tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save_pipeline(pipe, folder)


def _char_tokenizer(folder: Path, name: str = "tokenizer"):
    """A character-level ``CLIPTokenizer`` written to ``folder / name`` and loaded back."""
    from transformers import CLIPTokenizer

    from .tokenizers import write_char_tokenizer

    write_char_tokenizer(folder / name)
    return CLIPTokenizer.from_pretrained(str(folder / name))


def _build_sd(folder: Path, text_width: int, scheduler, unet_class=None, **unet_config) -> None:
    """A ``StableDiffusionPipeline`` into ``folder``: a character-level tokenizer, a tiny UNet with
    SD's blocks and ``unet_config`` whose cross-attention takes the ``text_width``-wide context of
    a 2-layer CLIP text encoder (seed 1), the tiny VAE and ``scheduler``."""
    from transformers import CLIPTextModel

    tokenizer = _char_tokenizer(folder)
    unet = tiny_unet(unet_class, **_SD_BLOCKS, cross_attention_dim=text_width, **unet_config)
    text_encoder = seeded(1, CLIPTextModel, clip_text_config(tokenizer, text_width))
    save_sd_pipeline(folder, unet, text_encoder, tokenizer, scheduler)


def build_tiny_sd(folder: Path, position_embedding: bool = False) -> None:
    """Write the ``tiny-sd`` pipeline into ``folder``: SD 1.x-shaped (conv projections, heads of
    4 and 8 channels), a 32-wide CLIP text encoder, DDIM. With ``position_embedding`` the UNet
    is a :class:`~.positional_unet.PositionalUNet2DConditionModel` (``tiny-sd-pos``, the demo
    model's architecture in small)."""
    from ..positional_unet import PositionalUNet2DConditionModel

    unet_class = PositionalUNet2DConditionModel if position_embedding else None
    _build_sd(folder, text_width=32, scheduler=sd_ddim_scheduler(), unet_class=unet_class, attention_head_dim=8)


def build_tiny_sd_pos(folder: Path) -> None:
    """``tiny-sd`` with a learnt position embedding after ``conv_in`` (still its sine start)."""
    build_tiny_sd(folder, position_embedding=True)


def build_tiny_sd2(folder: Path) -> None:
    """Write the ``tiny-sd2`` pipeline into ``folder``."""
    _build_sd(
        folder,
        text_width=64,
        scheduler=sd_ddim_scheduler(prediction_type="v_prediction"),
        attention_head_dim=(2, 4, 4),  # diffusers reads this as heads: 16-dim heads everywhere
        use_linear_projection=True,
        upcast_attention=True,
    )


def build_tiny_sdxl(folder: Path) -> None:
    """Write the ``tiny-sdxl`` pipeline into ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _char_tokenizer(folder, "tokenizer")
    tokenizer_2 = _char_tokenizer(folder, "tokenizer_2")
    projection_dim = 32
    time_embed_dim = 8
    unet = tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64,  # 32 (text_encoder) + 32 (text_encoder_2), concatenated
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 size/crop ids of time_embed_dim each + the pooled projection of text_encoder_2
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
    )
    text_encoder = seeded(1, CLIPTextModel, clip_text_config(tokenizer, 32))
    text_encoder_2 = seeded(
        3, CLIPTextModelWithProjection, clip_text_config(tokenizer_2, 32, projection_dim=projection_dim)
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    save_pipeline(pipe, folder)
