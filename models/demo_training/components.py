"""The built-in ``demo`` model: a small ``StableDiffusionPipeline`` trained on :mod:`.shapes`.

Components (untrained here; :mod:`.train` trains them and saves the pipeline):

* VAE: ``AutoencoderKL``, four blocks of 16/32/64/64 channels, 4 norm groups, factor 8, 4 latent channels
  (a 256 x 256 image has a 32 x 32 latent);
* UNet: :class:`~pcpp_runtime.models.positional_unet.PositionalUNet2DConditionModel` (``UNet2DConditionModel`` plus
  a learnt position embedding of 32 x 32 positions added to ``conv_in``'s output), 32/64/64/128
  channels, one layer per block, group norm (16 groups), self- and cross-attention at the
  16 x 16, 8 x 8 and 4 x 4 resolutions (three down-samplings: strips align to 8 latent rows, so
  32 rows still split over 4 workers). Without the embedding the UNet never tied the place words
  to positions, with three levels or four (docs/MODELS.md);
* text encoder: a 2-layer, 64-wide ``CLIPTextModel``;
* tokenizer: a ``CLIPTokenizer`` whose BPE merges spell every caption word as one token
  (:func:`write_word_tokenizer`); other text falls back to single characters;
* scheduler: DDIM with Stable Diffusion's scaled-linear betas.

The trained weights live in ``models/demo/`` (:data:`pcpp_runtime.models.builtin.DEMO_DIR`, 23 MB of
safetensors) and are loaded with ``StableDiffusionPipeline.from_pretrained`` like any checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..tiny.tokenizers import byte_characters, save_clip_tokenizer
from ..tiny.unets import clip_text_config, sd_ddim_scheduler
from .shapes import caption_words

__all__ = ["IMAGE_SIZE", "demo_components", "write_word_tokenizer"]

IMAGE_SIZE = 256
MAX_TOKENS = 32


def write_word_tokenizer(folder: Path, words: list[str] | None = None) -> None:
    """A ``CLIPTokenizer`` in ``folder`` that spells each of ``words`` (default: every caption word)
    as one token.

    The vocabulary holds the 256 byte characters (alone and word-final), the pieces the merges
    make, the words themselves and the two special tokens; ``merges.txt`` joins each word's pieces
    front to back, taking into account the merges earlier words added. A word outside the list is split into whatever pieces the merges make (never unknown).
    """
    words = caption_words() if words is None else words
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for char in byte_characters():
        add(char)
    for char in byte_characters():
        add(char + "</w>")
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:  # earlier words' merges may have split this one differently:
            ranks[(pieces[0], pieces[1])] = len(ranks)  # join what is there, front to back
            add(pieces[0] + pieces[1])
            pieces = _apply_merges(pieces, ranks)
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda item: item[1])]
    add("<|startoftext|>")
    add("<|endoftext|>")
    save_clip_tokenizer(folder, vocab, merges, MAX_TOKENS)


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP's tokenizer does it: join the adjacent pair of lowest
    rank, everywhere it occurs, until no pair has a rank."""
    while len(pieces) > 1:
        ranked = [(ranks[pair], pair) for pair in zip(pieces, pieces[1:]) if pair in ranks]
        if not ranked:
            break
        _, (left, right) = min(ranked)
        joined, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and pieces[i] == left and pieces[i + 1] == right:
                joined.append(left + right)
                i += 2
            else:
                joined.append(pieces[i])
                i += 1
        pieces = joined
    return pieces


def demo_components(tokenizer, seed: int = 0, position_embedding: bool = True) -> dict:
    """Untrained ``vae``, ``unet``, ``text_encoder`` and ``scheduler``, each seeded from ``seed``.

    ``position_embedding=False`` gives the UNet without its learnt position embedding (a plain
    ``UNet2DConditionModel``, which learns position only from zero padding: the experiment in
    ``benchmarks/place_learning.py``).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..positional_unet import PositionalUNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        # four groups of at least four channels: a group norm over one channel erases the
        # channel's mean, and with it a plain area's colour. 8/16/32/64 channels in 2 groups kept
        # no colour after 1500 steps; 16/32/64/64 in 4 groups kept 75 % after 400 (docs/MODELS.md)
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )
    torch.manual_seed(seed + 1)
    unet_class = PositionalUNet2DConditionModel if position_embedding else UNet2DConditionModel
    unet = unet_class(
        sample_size=IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        # 64 channels at 8 x 8 keep the weights under 25 MB (4.8 M parameters)
        block_out_channels=(32, 64, 64, 128),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, 64, heads=4))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": sd_ddim_scheduler()}
