"""Prompt fidelity of a shapes model, measured: does the colour a caption names dominate the cell
of the 3 x 3 grid the caption names?

    python -m pcpp_runtime.models.demo_training.fidelity [--model demo] [--seeds 2]

A case passes when, in the named cell, the named colour holds the most pixels of all shape
colours and at least ``min_share`` of the cell (:func:`.shapes.region_colour_shares`
classifies each pixel to its nearest palette colour). Cases are single-shape prompts, so the
check is not confused by one shape hiding another.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from .shapes import region_colour_shares, shape_phrase

__all__ = ["FIDELITY_PROMPTS", "FidelityCase", "check_image", "measure"]

#: (colour, shape, cell): single-shape prompts spread over colours, shapes and the nine cells
FIDELITY_PROMPTS: list[tuple[str, str, str]] = [
    ("red", "circle", "top left"),
    ("blue", "square", "center"),
    ("yellow", "triangle", "bottom right"),
    ("green", "circle", "top right"),
    ("purple", "square", "bottom left"),
    ("orange", "circle", "left"),
    ("red", "square", "right"),
    ("blue", "stripe", "top"),
    ("green", "triangle", "bottom"),
    ("yellow", "stripe", "left"),
]


@dataclass
class FidelityCase:
    prompt: str
    colour: str
    cell: str
    seed: int
    share: float  # share of the cell's pixels in the named colour
    strongest: str  # the shape colour with the most pixels in the cell
    passed: bool


def check_image(image: np.ndarray, colour: str, cell: str, min_share: float = 0.1) -> tuple[bool, float, str]:
    """(passed, share of ``colour`` in ``cell``, strongest shape colour there) for one image
    ``(H, W, 3)`` uint8 or ``(3, H, W)`` in [-1, 1]."""
    shares = region_colour_shares(image, cell)
    strongest = max(shares, key=shares.get)
    return strongest == colour and shares[colour] >= min_share, shares[colour], strongest


def measure(pipe, seeds: int = 1, steps: int = 20, guidance_scale: float = 5.0, cases=None) -> list[FidelityCase]:
    """Generate every case of ``cases`` (default :data:`FIDELITY_PROMPTS`) with ``seeds`` seeds
    each on ``pipe`` (one worker) and check it."""
    import torch

    results = []
    for colour, shape, cell in cases or FIDELITY_PROMPTS:
        prompt = shape_phrase(colour, shape, cell)
        for seed in range(seeds):
            out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(seed), output_type="np")
            image = (out.images[0] * 255).round().astype(np.uint8)
            passed, share, strongest = check_image(image, colour, cell)
            results.append(FidelityCase(prompt, colour, cell, seed, share, strongest, passed))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--device", default="cpu", help="torch device to generate on (default %(default)s; e.g. cuda)")
    args = p.parse_args(argv)
    from pcpp_runtime.pipelines import load_pipeline

    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    cases = measure(pipe, args.seeds, args.steps, args.guidance_scale)
    print("| prompt | seed | share of the named colour in its cell | strongest colour there | passed |")
    print("| --- | --- | --- | --- | --- |")
    for case in cases:
        print(f"| {case.prompt} | {case.seed} | {case.share:.2f} | {case.strongest} | {'yes' if case.passed else 'no'} |")
    passed = sum(case.passed for case in cases)
    print(f"\n{passed} of {len(cases)} cases passed ({100 * passed / len(cases):.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
