"""Side-by-side comparison of the policies on one prompt and seed (``pcpp generate --grid``).

Every run happens in this process: one worker first (the reference), then ``world`` ranks as
threads over the in-process ``local`` transport for each policy (``sync``, ``full``,
``partial(p)``, ``none``). The policies run through the same engine and exchange the same bytes
as over a process transport; only the time is not a speed-up (threads share the cores).

Image quality is measured on the decoded images, in ``[0, 1]``: PSNR (:func:`image_psnr`) and
SSIM (:func:`ssim`, Gaussian window of 11 pixels, sigma 1.5, the usual constants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ParallelConfig
from .generate import JobSpec, call_pipeline, load_pipeline
from .parallel import parallelize
from .threads import run_in_threads

__all__ = [
    "PolicyRun",
    "grid_policies",
    "image_psnr",
    "load_quiet_pipelines",
    "render_grid",
    "run_one_worker",
    "run_policy",
    "ssim",
]


@dataclass
class PolicyRun:
    """One generation: its label, decoded image ``(3, H, W)`` in [0, 1], and numbers."""

    label: str
    pixels: torch.Tensor
    latents: torch.Tensor
    world_size: int
    mb_per_step: float = 0.0  # received per rank per step after warm-up, mean over ranks
    psnr_db: float | None = None  # image PSNR against one worker (None: identical)
    ssim: float | None = None
    latent_psnr_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "world_size": self.world_size,
            "mb_received_per_step": self.mb_per_step,
            "image_psnr_db": self.psnr_db,
            "ssim": self.ssim,
            "latent_psnr_db": self.latent_psnr_db,
        }


def grid_policies(portion: float, warmup_steps: int, timeout_s: float) -> list[tuple[str, ParallelConfig]]:
    """The grid's policies, in picture order: (label, config)."""
    policies = [("sync", "sync"), ("full", "full"), (f"partial({portion:g})", "partial"), ("none", "none")]
    return [
        (label, ParallelConfig(policy=name, portion=portion, warmup_steps=warmup_steps, timeout_s=timeout_s))
        for label, name in policies
    ]


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The first latent of the batch as an image ``(3, H, W)`` in [0, 1]."""
    with torch.no_grad():
        image = pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return (image[0].float() / 2 + 0.5).clamp(0, 1)


def load_quiet_pipelines(model: str, count: int, scheduler: str | None = None) -> list:
    """``count`` copies of the pipeline (one per rank; loading is not thread-safe, so it happens
    here, before the threads start), progress bars off."""
    pipes = [load_pipeline(model, scheduler) for _ in range(count)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def run_one_worker(pipe, spec: JobSpec, height: int, width: int) -> PolicyRun:
    """The reference: the unwrapped pipeline on one worker."""
    latents = call_pipeline(pipe, spec, height, width)
    return PolicyRun("1 worker", _decode(pipe, latents), latents, 1)


def run_policy(pipes: list, spec: JobSpec, height: int, width: int, world: int, config: ParallelConfig, label: str,
               reference: PolicyRun) -> PolicyRun:
    """``world`` ranks (``pipes[r]`` on rank ``r``) as threads over the local transport, compared
    with ``reference``. The pipelines are unwrapped again afterwards, so they can be reused."""
    from .generate import psnr

    if len(pipes) < world:
        raise ValueError(f"{world} ranks need {world} pipelines, got {len(pipes)}")

    def rank(transport):
        parallel = parallelize(pipes[transport.rank], transport, config)
        try:
            latents = call_pipeline(parallel, spec, height, width)
            steps = parallel.runtime.num_steps
            after = range(min(config.warmup_steps, steps), steps)
            return latents, parallel.runtime.ledger.per_step_mean(after, "received")["total"]
        finally:
            parallel.denoiser.remove()

    results = run_in_threads(world, rank, config.timeout_s * 4)
    latents = results[0][0]
    received = [r[1] for r in results]
    pixels = _decode(pipes[0], latents)
    return PolicyRun(
        label,
        pixels,
        latents,
        world,
        mb_per_step=sum(received) / len(received) / 1e6,
        psnr_db=_finite(image_psnr(pixels, reference.pixels)),
        ssim=ssim(pixels, reference.pixels),
        latent_psnr_db=_finite(psnr(latents, reference.latents)),
    )


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else value


def image_psnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (``inf`` when equal)."""
    mse = torch.mean((test.double() - reference.double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(test: torch.Tensor, reference: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity of two images ``(C, H, W)`` in [0, 1] (Wang et al. 2004):
    Gaussian-weighted local means, variances and covariance per channel over valid windows,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``; 1.0 for identical images."""
    if test.shape != reference.shape or test.dim() != 3:
        raise ValueError(f"ssim needs two (C, H, W) images of one shape, got {tuple(test.shape)} and {tuple(reference.shape)}")
    x = test.double().unsqueeze(0)
    y = reference.double().unsqueeze(0)
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(index.mean())


def render_grid(runs: list[PolicyRun], title: str, target: str | Path) -> None:
    """One PNG: the runs side by side, each labelled with its PSNR against one worker and its
    bytes per step, under a title line."""
    from PIL import Image, ImageDraw, ImageFont

    from .generate import write_atomically

    tiles = [Image.fromarray((run.pixels.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for run in runs]
    scale = max(1, math.ceil(192 / tiles[0].size[0]))  # small images are enlarged so labels fit under them
    tiles = [tile.resize((tile.size[0] * scale, tile.size[1] * scale), Image.NEAREST) for tile in tiles]
    width, height = tiles[0].size
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    pad, line = 6, 18
    canvas_width = len(tiles) * (width + pad) + pad
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines: list[str] = []
    for word in title.split(" "):  # wrap the title to the canvas width
        trial = f"{title_lines[-1]} {word}" if title_lines else word
        if title_lines and measure.textlength(trial, font=font) <= canvas_width - 2 * pad:
            title_lines[-1] = trial
        else:
            title_lines.append(word)
    header = pad + line * len(title_lines) + pad
    canvas = Image.new("RGB", (canvas_width, header + height + 3 * line + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text((pad, pad + i * line), text, fill="black", font=font)
    for i, (run, tile) in enumerate(zip(runs, tiles)):
        x = pad + i * (width + pad)
        canvas.paste(tile, (x, header))
        if run.world_size == 1:
            details = ["reference"]
        else:
            quality = "identical" if run.psnr_db is None else f"PSNR {run.psnr_db:.1f} dB"
            details = [quality, f"{run.mb_per_step:.2f} MB/step"]
        for j, text in enumerate([run.label] + details):
            draw.text((x, header + height + 2 + j * line), text, fill="black", font=font)
    write_atomically(target, lambda path: canvas.save(path, format="PNG"))
