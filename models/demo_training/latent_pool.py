"""A folder of encoded scene pools, so training runs that share a VAE and a pool encode it once.

The UNet stage of :mod:`.train` trains on ``--scenes`` scenes encoded by the VAE (about
5 minutes for 6000 on 2 cores). Runs that continue one another with ``--unet-init`` on the same
VAE, seed and share of one-shape scenes encode the very same pool; with ``--pool-cache DIR`` the
first run saves it and the later ones load it, bit for bit what they would have encoded.

A pool is stored as ``DIR/pool-<key>.safetensors``: one tensor ``latents`` ``(N, 4, 32, 32)``
float32 (already multiplied by the VAE's ``scaling_factor``), and the captions as a JSON list in
the file's metadata. ``<key>`` is a hash of everything the encoded values depend on: the VAE's
weights and config, the seed, the scene count, the one-shape share, the device type, the thread
count, the torch version, and the source code that draws and encodes the scenes (so a change to
the shapes data set encodes a new pool instead of loading an old one). Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["pool_key", "load_pool", "save_pool"]


def pool_key(vae, *, seed: int, scenes: int, one_shape_share: float, device: str, threads: int, code: str) -> str:
    """A 16-hex-digit key for the pool ``vae`` would encode from these settings; ``code`` is the
    source of the functions that draw and encode the scenes."""
    import torch

    digest = hashlib.sha256()
    settings = dict(seed=seed, scenes=scenes, one_shape_share=one_shape_share, device=torch.device(device).type,
                    threads=threads, torch=torch.__version__, code=code,
                    # not the bookkeeping entries (_name_or_path, _diffusers_version...), which differ between
                    # a VAE trained in this run and the same VAE loaded from where it was saved
                    vae_config={k: v for k, v in vae.config.items() if not k.startswith("_")})
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _path(folder: Path, key: str) -> Path:
    return Path(folder) / f"pool-{key}.safetensors"


def load_pool(folder: Path, key: str):
    """The pool saved under ``key`` as ``(latents (N, 4, 32, 32), captions)``, or None if there is none.
    A file that does not hold as many captions as latents is refused with its path."""
    from safetensors import safe_open

    path = _path(folder, key)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        latents = f.get_tensor("latents")
        captions = json.loads(f.metadata()["captions"])
    if len(captions) != latents.shape[0]:
        raise ValueError(f"{path}: {latents.shape[0]} latents but {len(captions)} captions; delete the file "
                         f"and the next run encodes the pool again")
    return latents, captions


def save_pool(folder: Path, key: str, latents, captions: list[str]) -> Path:
    """Save ``latents`` ``(N, 4, 32, 32)`` and their ``captions`` under ``key``; written to a
    temporary name and renamed, so a run stopped half-way leaves no partial pool behind."""
    from safetensors.torch import save_file

    from ...files import write_atomically

    path = _path(folder, key)
    tensors = {"latents": latents.detach().cpu().contiguous()}
    write_atomically(path, lambda staging: save_file(tensors, str(staging), metadata={"captions": json.dumps(captions)}))
    return path
