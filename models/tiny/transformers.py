"""Built-in tiny diffusion-transformer pipelines: ``tiny-dit`` and ``tiny-pixart``.

Both have a 16 x 16 latent (a 32 x 32 image through the factor-2 VAE of
:func:`.unets.tiny_vae`), 2 x 2 patches (an 8 x 8 token grid, strips
align to 2 latent rows), two transformer blocks of width 32, and ``out_channels = 8``: they
predict the noise and a variance ("learned sigma"), as the released checkpoints do.

* ``tiny-dit`` -- ``DiTPipeline``, class-conditional over 1000 classes (the pipeline uses
  class 1000 as the null class for guidance).
* ``tiny-pixart`` -- ``PixArtAlphaPipeline`` with a 2-layer ``T5EncoderModel`` and a
  character-level T5 tokenizer built here (a ``tokenizers`` Unigram model, no download). The
  same components load into ``PixArtSigmaPipeline`` (PixArt-sigma differs in the pipeline only).
"""

from __future__ import annotations

import string
from pathlib import Path

__all__ = ["build_tiny_dit", "build_tiny_pixart", "write_char_t5_tokenizer"]

#: T5's fixed ids: <pad> = 0, </s> = 1, <unk> = 2
_T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def write_char_t5_tokenizer(folder: Path, max_length: int = 120) -> None:
    """A T5 tokenizer whose vocabulary is the printable ASCII characters (a Unigram model of
    single characters, each also with T5's word-start marker), saved to ``folder``."""
    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [(token, 0.0) for token in _T5_SPECIAL] + [("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in chars] + [("\u2581" + c, -3.0) for c in chars]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


#: what both tiny transformers share: a ``(B, 4, 16, 16)`` latent in 2 x 2 patches, two blocks of
#: two 16-dimensional heads (width 32), noise and variance out (8 channels)
_TRANSFORMER_LAYOUT = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=16,
    patch_size=2,
)


def build_tiny_dit(folder: Path) -> None:
    """Write the ``tiny-dit`` pipeline into ``folder``."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from .unets import SD_BETAS, save_pipeline, seeded, tiny_vae

    transformer = seeded(0, DiTTransformer2DModel, **_TRANSFORMER_LAYOUT, num_embeds_ada_norm=1000)
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False)
    save_pipeline(DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=scheduler), folder)


def build_tiny_pixart(folder: Path) -> None:
    """Write the ``tiny-pixart`` pipeline into ``folder``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    from .unets import SD_BETAS, save_pipeline, seeded, tiny_vae

    write_char_t5_tokenizer(folder / "tokenizer")
    tokenizer = T5TokenizerFast.from_pretrained(str(folder / "tokenizer"))
    transformer = seeded(
        0,
        PixArtTransformer2DModel,
        **_TRANSFORMER_LAYOUT,
        cross_attention_dim=32,  # = the transformer's width, as in the released models
        caption_channels=32,  # = the T5 encoder's d_model
        use_additional_conditions=False,
    )
    text_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    text_encoder = seeded(1, T5EncoderModel, text_config)
    scheduler = DPMSolverMultistepScheduler(**SD_BETAS)
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(), transformer=transformer, scheduler=scheduler
    )
    save_pipeline(pipe, folder)
