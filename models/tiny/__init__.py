"""Small models built offline from configs, saved with ``save_pretrained`` and loaded back
through the same ``from_pretrained`` path a hub id takes.

``tiny-sd`` is a complete ``StableDiffusionPipeline`` with random weights seeded so it is the
same on every machine (for a given torch version): a UNet with group norm, two down-samplings
and self-attention at two resolutions; a 2-layer CLIP text encoder with a character-level
tokenizer made here; a small VAE (factor 2: a 64 x 64 image has a 32 x 32 latent); DDIM.

``tiny-sd-pos`` is the same with a learnt position embedding after ``conv_in`` (the ``demo``
model's UNet class). Other families (``tiny-sd2``, ``tiny-sdxl``, ``tiny-dit``, ``tiny-pixart``) are built in
:mod:`.unets` and :mod:`.transformers` the same way.

:func:`tiny_model_path` gives a model's folder; :mod:`pcpp_runtime.models.builtin` resolves
every built-in name (these and the trained ``demo``). Built models are cached under ``$PCPP_MODEL_CACHE`` (default ``~/.cache/pcpp-runtime/models``),
written to a temporary folder first and renamed, so ranks starting together do not collide.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .transformers import build_tiny_dit, build_tiny_pixart
from .unets import build_tiny_sd, build_tiny_sd2, build_tiny_sd_pos, build_tiny_sdxl

__all__ = ["TINY_MODELS", "model_cache_dir", "tiny_model_path"]

#: bump when a builder's output changes, so stale caches are not reused
_BUILD_VERSION = 1


def model_cache_dir() -> Path:
    return Path(os.environ.get("PCPP_MODEL_CACHE", Path.home() / ".cache" / "pcpp-runtime" / "models"))


#: name -> builder writing a diffusers folder (in :mod:`.unets` and :mod:`.transformers`;
#: docs/MODELS.md lists what each one is)
TINY_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-sd-pos": build_tiny_sd_pos,
    "tiny-sd2": build_tiny_sd2,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-dit": build_tiny_dit,
    "tiny-pixart": build_tiny_pixart,
}


def tiny_model_path(name: str) -> Path:
    """The folder of tiny model ``name``, built into the cache on first use (a ``KeyError``
    naming the tiny models for an unknown name)."""
    try:
        builder = TINY_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown tiny model {name!r}; tiny models: {', '.join(sorted(TINY_MODELS))}") from None
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
