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

    from pcpp_runtime.models.demo_model import demo_components, write_word_tokenizer
    from pcpp_runtime.models.shapes import POSITIONS, render, sample_scene, shape_phrase
    from pcpp_runtime.models.train_demo import _lr_at, _noise_schedule

    torch.set_num_threads(args.threads)
    write_word_tokenizer(args.work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(args.work / "tokenizer"))
    parts = demo_components(tokenizer, seed=0)
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
    generator = torch.Generator().manual_seed(0)

    def probe() -> tuple[int, list[str]]:
        unet.eval()
        text_encoder.eval()
        hits, rows = 0, []
        with torch.no_grad():
            for place, ((row, col), _) in POSITIONS.items():
                context = text_encoder(ids([shape_phrase("red", "circle", place)]))[0]
                cells = []
                for n in range(2):
                    x = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(n))
                    v = unet(x, torch.tensor([999]), context).sample
                    x0 = alpha_last.sqrt() * x - (1 - alpha_last).sqrt() * v
                    centre = red_centre(decoded_pixels(vae, x0))
                    if centre is None:
                        cells.append("no red")
                        continue
                    hits += int(centre[0]) == row and int(centre[1]) == col
                    cells.append(f"{centre[0]:.1f}, {centre[1]:.1f}")
                rows.append(f"| {place} | {row + 0.5:.1f}, {col + 0.5:.1f} | " + " | ".join(cells) + " |")
        unet.train()
        text_encoder.train()
        return hits, rows

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
            hits, rows = probe()
            print(f"\nstep {step + 1} ({time.perf_counter() - started:.0f} s), loss {loss.item():.3f}: "
                  f"red centre (row, column) from pure noise at t = 999, in the named cell {hits} of 18")
            print("| place | wanted | noise 0 | noise 1 |\n| --- | --- | --- | --- |")
            print("\n".join(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
