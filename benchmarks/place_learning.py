"""How fast does the demo UNet learn the place words? A short training on shapes scenes.

    .venv/bin/python benchmarks/place_learning.py --vae out/train-demo/vae [--steps 450] [--t-from 999]

Trains a fresh ``demo`` UNet and text encoder (v-prediction, zero terminal SNR) on ``--scenes``
scenes of one shape (``--max-shapes 3``: one to three, as ``train_demo``), with timesteps drawn
uniformly from ``--t-from``..999 only, and every ``--probe-every`` steps reports where the red of
"a red circle <place>" lands in the clean image the raw (not averaged) weights predict from pure
noise at t = 999, for the nine places and two noises (``place_probe.red_centre``: row, column in grid cells 0..3).

At t = 999 the input holds nothing of the picture, so only the caption can move the red: with
``--t-from 999`` this measures how many steps the architecture needs to tie a place word to a
position when nothing else competes. It needs a VAE saved by ``train_demo`` (``WORK/vae``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from place_probe import decoded_pixels, red_centre  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", type=Path, required=True, help="a VAE folder saved by train_demo (WORK/vae)")
    p.add_argument("--steps", type=int, default=450)
    p.add_argument("--t-from", type=int, default=999, help="lowest training timestep (default %(default)s)")
    p.add_argument("--scenes", type=int, default=1024)
    p.add_argument("--max-shapes", type=int, default=1, help="shapes per scene, 1 to this (default %(default)s; train_demo: 3)")
    p.add_argument("--probe-every", type=int, default=150)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--position", choices=("padding", "learnt"), default="learnt",
                   help="where the UNet learns position from: 'learnt' (the demo UNet: a learnt embedding of "
                        "shape (32, 32, 32), started from 2-D sines, added to conv_in's output) or 'padding' "
                        "(a plain UNet2DConditionModel: zero padding only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the training stream")
    p.add_argument("--work", type=Path, default=Path("out/place-learning"), help="where the tokenizer is written")
    args = p.parse_args()
    if not 0 <= args.t_from <= 999:
        p.error(f"--t-from must be a timestep in 0..999, got {args.t_from}")
    if not 1 <= args.max_shapes <= 3:
        p.error(f"--max-shapes must be 1, 2 or 3, got {args.max_shapes}")
    if not (args.vae / "config.json").exists():
        p.error(f"--vae {args.vae} holds no VAE (no config.json); train_demo saves one in WORK/vae")
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from pcpp_runtime.models.demo_training.components import demo_components, write_word_tokenizer
    from pcpp_runtime.models.demo_training.shapes import POSITIONS, render, sample_scene, shape_phrase
    from pcpp_runtime.models.demo_training.train import _lr_at, _noise_schedule

    torch.set_num_threads(args.threads)
    write_word_tokenizer(args.work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(args.work / "tokenizer"))
    parts = demo_components(tokenizer, seed=args.seed, position_embedding=args.position == "learnt")
    unet, text_encoder = parts["unet"], parts["text_encoder"]
    vae = AutoencoderKL.from_pretrained(str(args.vae)).eval()
    scale = vae.config.scaling_factor

    def ids(captions):
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids

    rng = np.random.default_rng(5)
    latents, captions = [], []
    with torch.no_grad():
        for _ in range(0, args.scenes, 64):
            scenes = [sample_scene(rng, max_shapes=args.max_shapes) for _ in range(64)]
            images = torch.from_numpy(np.stack([render(scene) for scene in scenes]))
            latents.append(vae.encode(images).latent_dist.mean * scale)
            captions += [scene.caption for scene in scenes]
    latents, caption_ids = torch.cat(latents), ids(captions)
    noise_schedule = _noise_schedule(zero_terminal_snr=True)
    alpha_last = noise_schedule.alphas_cumprod[999]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(args.seed)
    templates = _place_templates(vae, scale)

    def probe() -> tuple[int, list[str]]:
        unet.eval()
        text_encoder.eval()
        hits, rows, means = 0, [], []
        with torch.no_grad():
            for place, ((row, col), _) in POSITIONS.items():
                context = text_encoder(ids([shape_phrase("red", "circle", place)]))[0]
                cells, predictions = [], []
                for n in range(2):
                    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(n))
                    v = unet(x, torch.tensor([999]), context).sample
                    x0 = alpha_last.sqrt() * x - (1 - alpha_last).sqrt() * v
                    predictions.append(x0[0])
                    centre = red_centre(decoded_pixels(vae, x0))
                    if centre is None:
                        cells.append("no red")
                        continue
                    hits += int(centre[0]) == row and int(centre[1]) == col
                    cells.append(f"{centre[0]:.1f}, {centre[1]:.1f}")
                rows.append(f"| {place} | {row + 0.5:.1f}, {col + 0.5:.1f} | " + " | ".join(cells) + " |")
                means.append(torch.stack(predictions).mean(0))
        unet.train()
        text_encoder.train()
        return hits, rows, _template_matches(torch.stack(means), templates)

    started = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, latents.shape[0], (16,), generator=generator)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(args.t_from, 1000, (16,), generator=generator)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.steps, 1e-3)
        prediction = unet(noise_schedule.add_noise(x0, noise, t), t, text_encoder(caption_ids[index])[0]).sample
        loss = (prediction - noise_schedule.get_velocity(x0, noise, t)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.probe_every == 0 or step + 1 == args.steps:
            hits, rows, (matched, cosine) = probe()
            print(f"\nstep {step + 1} ({time.perf_counter() - started:.0f} s), loss {loss.item():.3f}: "
                  f"red centre (row, column) from pure noise at t = 999, in the named cell {hits} of 18; "
                  f"latent template match {matched} of 9 (mean cosine with the named place's {cosine:.2f})")
            print("| place | wanted | noise 0 | noise 1 |\n| --- | --- | --- | --- |")
            print("\n".join(rows), flush=True)
    return 0


def _place_templates(vae, scale: float, per_place: int = 16):
    """Mean clean latent ``(9, 4, h, w)`` of ``per_place`` single red circles in each place (order of
    ``POSITIONS``), jittered and sized like the data set, on random backgrounds."""
    import torch

    from pcpp_runtime.models.demo_training.shapes import BACKGROUNDS, POSITIONS, Scene, placed_shape, render

    rng = np.random.default_rng(11)
    templates = []
    with torch.no_grad():
        for place in POSITIONS:
            scenes = []
            for _ in range(per_place):
                shape = placed_shape(rng, "circle", "red", place)
                tone = str(rng.choice(list(BACKGROUNDS)))
                scenes.append(Scene((shape,), (tone, tone)))
            images = torch.from_numpy(np.stack([render(scene) for scene in scenes]))
            templates.append((vae.encode(images).latent_dist.mean * scale).mean(0))
    return torch.stack(templates)


def _template_matches(predictions, templates) -> tuple[int, float]:
    """How many of the nine place predictions ``(9, 4, h, w)`` are closest (cosine) to the template of
    their own place, after both sets lose their mean over the places (what the place word does not
    move); and the mean cosine of each with its own place's template."""
    import torch

    moved = (predictions - predictions.mean(0, keepdim=True)).flatten(1)
    wanted = (templates - templates.mean(0, keepdim=True)).flatten(1)
    cosine = torch.nn.functional.normalize(moved, dim=1) @ torch.nn.functional.normalize(wanted, dim=1).T
    matched = int((cosine.argmax(1) == torch.arange(9)).sum())
    return matched, float(cosine.diagonal().mean())


if __name__ == "__main__":
    sys.exit(main())
