"""Side-by-side comparison of the policies on one prompt and seed (``pcpp generate --grid``).

Every run goes through :func:`pcpp_runtime.jobs.run` in this process: one worker first (the
reference), then ``world`` ranks as threads for each policy (``sync``, ``full``, ``partial(p)``,
``none``), reusing one set of loaded pipelines. The policies run through the same engine and
exchange the same bytes as over a process transport; only the time is not a speed-up (threads
share the cores).

Image quality is measured on the decoded images, in ``[0, 1]``: PSNR and SSIM
(:mod:`pcpp_runtime.metrics`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .config import ParallelConfig
from .jobs import SCHEMA_VERSION, JobResult, JobSpec, Threads
from .jobs import run as run_job
from .metrics import finite_or_none, psnr, ssim

__all__ = ["GridResult", "PolicyRun", "grid_policies", "render_grid", "run_grid", "run_one_worker", "run_policy"]


@dataclasses.dataclass
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

    @classmethod
    def of(cls, label: str, result: JobResult, reference: PolicyRun | None = None) -> PolicyRun:
        """A job's result as a run of the grid, compared with ``reference`` when given."""
        received = [r.received_per_step["total"] for r in result.ranks]
        run = cls(label, result.pixels, result.latents, result.world_size, mb_per_step=sum(received) / len(received) / 1e6)
        if reference is not None:
            run.psnr_db = finite_or_none(psnr(run.pixels, reference.pixels, 1.0))
            run.ssim = ssim(run.pixels, reference.pixels)
            run.latent_psnr_db = finite_or_none(psnr(run.latents, reference.latents))
        return run

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "world_size": self.world_size,
            "mb_received_per_step": self.mb_per_step,
            "image_psnr_db": self.psnr_db,
            "ssim": self.ssim,
            "latent_psnr_db": self.latent_psnr_db,
        }


@dataclasses.dataclass
class GridResult:
    """The grid's runs, the one worker first, and what they share."""

    spec: JobSpec
    warmup_steps: int
    world_size: int
    height: int
    width: int
    runs: list[PolicyRun]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "model": self.spec.model,
            "prompt": self.spec.prompt,
            "seed": self.spec.seed,
            "steps": self.spec.steps,
            "warmup_steps": self.warmup_steps,
            "world_size": self.world_size,
            "height": self.height,
            "width": self.width,
            "runs": [run.to_dict() for run in self.runs],
        }

    def title(self) -> str:
        return (f'"{self.spec.prompt}"  seed {self.spec.seed}, {self.spec.steps} steps ({self.warmup_steps} warm-up), '
                f"{self.world_size} workers")

    def write(self, output: str | Path, report: str | Path | None = None) -> None:
        """The picture (:func:`render_grid`) to ``output`` and the JSON report to ``report``."""
        from .files import write_json

        render_grid(self.runs, self.title(), output)
        if report:
            write_json(report, self.to_json())

    def summary(self) -> str:
        """One line per policy: its quality against one worker and its bytes."""
        lines = []
        for run in self.runs[1:]:
            quality = "identical" if run.psnr_db is None else f"image PSNR {run.psnr_db:.2f} dB, SSIM {run.ssim:.4f}"
            lines.append(f"  {run.label:>14}: {quality}, {run.mb_per_step:.3f} MB received per rank per step")
        return "\n".join(lines)


def grid_policies(portion: float, warmup_steps: int, timeout_s: float) -> list[tuple[str, ParallelConfig]]:
    """The grid's policies, in picture order: (label, config)."""
    policies = [("sync", "sync"), ("full", "full"), (f"partial({portion:g})", "partial"), ("none", "none")]
    return [
        (label, ParallelConfig(policy=name, portion=portion, warmup_steps=warmup_steps, timeout_s=timeout_s))
        for label, name in policies
    ]


def run_one_worker(pipe, spec: JobSpec) -> PolicyRun:
    """The reference: ``pipe`` on one worker (nothing attached: the stock pipeline)."""
    return PolicyRun.of("1 worker", run_job(spec, ParallelConfig(), Threads(1), pipelines=[pipe], progress=False))


def run_policy(pipes: list, spec: JobSpec, world: int, config: ParallelConfig, label: str, reference: PolicyRun) -> PolicyRun:
    """``world`` thread ranks (``pipes[r]`` on rank ``r``) under ``config``, compared with
    ``reference``; the pipelines come back unwrapped, so they can be used again."""
    result = run_job(spec, config, Threads(world), pipelines=pipes[:world], progress=False)
    return PolicyRun.of(label, result, reference)


def run_grid(spec: JobSpec, world: int, config: ParallelConfig, *, progress: bool = True) -> GridResult:
    """One worker, then every policy of :func:`grid_policies` on ``world`` thread ranks (portion,
    warm-up and timeout from ``config``). Raises before any compute for a bad shape or model."""
    from tqdm.auto import tqdm

    from .pipelines import check_shape, image_size, load_pipelines

    if world < 2:
        raise ValueError(f"the grid compares policies across workers: it needs at least 2, got {world}")
    pipes = load_pipelines(spec.model, 1, spec.scheduler)
    height, width = image_size(pipes[0], spec)
    check_shape(pipes[0], height, width, world, config)
    pipes += load_pipelines(spec.model, world - 1, spec.scheduler)
    policies = grid_policies(config.portion, config.warmup_steps, config.timeout_s)
    bar = tqdm(total=1 + len(policies), desc="grid", unit="run", file=sys.stderr, disable=not progress)
    runs = [run_one_worker(pipes[0], spec)]
    bar.update()
    for label, policy_config in policies:
        bar.set_postfix_str(label)
        runs.append(run_policy(pipes, spec, world, policy_config, label, runs[0]))
        bar.update()
    bar.close()
    return GridResult(spec, config.warmup_steps, world, height, width, runs)


def render_grid(runs: list[PolicyRun], title: str, target: str | Path) -> None:
    """One PNG: the runs side by side, each labelled with its PSNR against one worker and its
    bytes per step, under a title line."""
    from PIL import Image, ImageDraw, ImageFont

    from .files import write_atomically

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
