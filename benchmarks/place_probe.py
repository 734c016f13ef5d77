"""Does a shapes model place what a caption names? A probe of the first denoising step.

    .venv/bin/python benchmarks/place_probe.py [--model demo] [--noises 4] [--t T]

For "a red circle <place>" at each of the nine places, and a few fixed noises, the UNet's
prediction of the clean image at timestep ``--t`` (default: the first timestep of a 20-step run
of the model's own scheduler: 951 for Stable Diffusion's DDIM, 999 with 'trailing' timesteps) is
decoded, and the centre of mass of its redness is reported in grid cells (row, column in
0..2). If the centres follow the place words, the layout is decided by the text from the first
step and a failed fidelity check lies in sampling; if they stay put whatever the caption says,
the model has not bound places to positions.

Only the prediction type of the model's scheduler config is read: ``epsilon`` or ``v_prediction``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def predicted_x0(pipe, prompt: str, noise, t: int, guidance: float):
    """The clean latent ``(1, 4, h, w)`` the UNet predicts from ``noise`` at timestep ``t`` with
    classifier-free guidance ``guidance``."""
    import torch

    alphas = pipe.scheduler.alphas_cumprod
    a, s = alphas[t].sqrt(), (1 - alphas[t]).sqrt()
    x_t = noise  # at t near the end, x_t is almost pure noise; this probe takes it as such
    embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, True, "")
    with torch.no_grad():
        out = pipe.unet(torch.cat([x_t, x_t]), torch.tensor([t, t]), torch.cat([negative, embeds])).sample
    uncond, cond = out.chunk(2)
    pred = uncond + guidance * (cond - uncond)
    if pipe.scheduler.config.prediction_type == "v_prediction":
        return a * x_t - s * pred
    return (x_t - s * pred) / a


def decoded_pixels(vae, x0) -> np.ndarray:
    """The clean latent ``x0`` ``(1, 4, h, w)`` decoded by ``vae``: ``(8h, 8w, 3)`` uint8."""
    image = vae.decode(x0 / vae.config.scaling_factor).sample[0]
    return ((image.clamp(-1, 1).permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def red_centre(image: np.ndarray) -> tuple[float, float] | None:
    """Centre of mass (row, column, in grid cells 0..3) of the image's redness, or None when the
    image is hardly red anywhere. ``image``: ``(H, W, 3)`` in 0..255.

    Redness is how far red exceeds the larger of green and blue (0 for the neutral backgrounds):
    a soft measure, because a prediction of the clean image from pure noise is the blurred mean
    of every picture the caption allows, a faint red tint over the named cell rather than a red
    circle a nearest-colour test would find.
    """
    rgb = image.astype(np.float32)
    redness = np.clip(rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]), 0, None)
    if redness.mean() < 1.0:
        return None
    rows, cols = np.indices(redness.shape, dtype=np.float32) + 0.5
    total = redness.sum()
    return 3 * (rows * redness).sum() / total / image.shape[0], 3 * (cols * redness).sum() / total / image.shape[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--noises", type=int, default=4)
    p.add_argument("--t", type=int, default=None, help="timestep (default: the first of a 20-step run)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    args = p.parse_args()
    import torch

    from pcpp_runtime.pipelines import load_pipeline
    from pcpp_runtime.models.demo_training.shapes import POSITIONS, shape_phrase

    pipe = load_pipeline(args.model)
    size = pipe.unet.config.sample_size
    if args.t is None:
        pipe.scheduler.set_timesteps(20)
        args.t = int(pipe.scheduler.timesteps[0])
    print(f"red centre of mass (row, column in cells 0..3) of the predicted clean image at t = {args.t}")
    print("| place | wanted | " + " | ".join(f"noise {n}" for n in range(args.noises)) + " |")
    print("| --- | --- |" + " --- |" * args.noises)
    hits = total = 0
    for place, ((row, col), _) in POSITIONS.items():
        cells = []
        for n in range(args.noises):
            noise = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(n))
            x0 = predicted_x0(pipe, shape_phrase("red", "circle", place), noise, args.t, args.guidance_scale)
            with torch.no_grad():
                pixels = decoded_pixels(pipe.vae, x0)
            centre = red_centre(pixels)
            total += 1
            if centre is None:
                cells.append("no red")  # redness under 1 of 255 on average
                continue
            hits += int(centre[0]) == row and int(centre[1]) == col
            cells.append(f"{centre[0]:.1f}, {centre[1]:.1f}")
        print(f"| {place} | {row + 0.5:.1f}, {col + 0.5:.1f} | " + " | ".join(cells) + " |")
    print(f"\nred centre in the named cell: {hits} of {total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
