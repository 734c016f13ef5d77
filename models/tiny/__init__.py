"""Small models built offline from configs, saved with ``save_pretrained`` and loaded back
through the same ``from_pretrained`` path a hub id takes.

``tiny-sd`` is a complete ``StableDiffusionPipeline`` with random weights seeded so it is the
same on every machine (for a given torch version): a UNet with group norm, two down-samplings
and self-attention at two resolutions; a 2-layer CLIP text encoder with a character-level
tokenizer made here; a small VAE (factor 2: a 64 x 64 image has a 32 x 32 latent); DDIM.

``tiny-sd-pos`` is the same with a learnt position embedding after ``conv_in`` (the ``demo``
model's UNet class). Other families (``tiny-sd2``, ``tiny-sdxl``, ``tiny-dit``, ``tiny-pixart``) are built in
:mod:`.tiny_unets` and :mod:`.tiny_transformers` the same way.

Built models are cached under ``$PCPP_MODEL_CACHE`` (default ``~/.cache/pcpp-runtime/models``),
written to a temporary folder first and renamed, so ranks starting together do not collide.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .tiny_transformers import build_tiny_dit, build_tiny_pixart
from .tiny_unets import build_tiny_sd, build_tiny_sd2, build_tiny_sd_pos, build_tiny_sdxl

__all__ = ["BUILTIN_MODELS", "TRAINED_MODELS", "build_tiny_sd", "builtin_model_path", "builtin_names", "model_cache_dir"]

#: bump when a builder's output changes, so stale caches are not reused
_BUILD_VERSION = 1


def model_cache_dir() -> Path:
    return Path(os.environ.get("PCPP_MODEL_CACHE", Path.home() / ".cache" / "pcpp-runtime" / "models"))


def _byte_characters() -> list[str]:
    """The 256 printable characters byte-level BPE tokenizers (CLIP's) use for the 256 bytes:
    printable Latin-1 bytes stand for themselves, the others map to code points from 256 up."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars = []
    extra = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _write_char_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer whose vocabulary is single characters (no merges): small and offline."""
    from transformers import CLIPTokenizer

    chars = _byte_characters()
    vocab = {}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    tokenizer.save_pretrained(str(folder))


#: built-in name -> builder writing a diffusers folder (the other families' builders live in
#: tiny_unets.py and tiny_transformers.py; docs/MODELS.md lists what each one is)
BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sd-pos": build_tiny_sd_pos,
    "tiny-sd2": build_tiny_sd2,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-dit": build_tiny_dit,
    "tiny-pixart": build_tiny_pixart,
}


#: built-in name -> folder of trained weights committed in the repo (``make train-demo`` makes them)
TRAINED_MODELS: dict[str, Path] = {"demo": Path(__file__).resolve().parent / "demo"}


def builtin_names() -> list[str]:
    return sorted(TRAINED_MODELS) + sorted(BUILTIN_MODELS)


def builtin_model_path(name: str) -> Path:
    """The folder of built-in model ``name``: the committed weights of a trained one, or a tiny
    random-weight one built on first use."""
    if name in TRAINED_MODELS:
        folder = TRAINED_MODELS[name]
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(f"the trained weights of built-in model {name!r} are missing from {folder}; run `make train-demo`")
        return folder
    try:
        builder = BUILTIN_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown built-in model {name!r}; built-in: {', '.join(builtin_names())}") from None
    import torch

    target = model_cache_dir() / f"{name}-v{_BUILD_VERSION}-torch{torch.__version__.split('+')[0]}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        builder(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").exists():  # not a concurrent builder's: real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
