"""Train the built-in ``demo`` model on the procedural shapes data set (``make train-demo``).

    python -m pcpp_runtime.models.demo_training.train [--out models/demo] [--work out/train-demo]

Three stages, on the CPU by default (``--device cuda`` for a GPU), reproducible from ``--seed``
(same device, torch version and thread count):

1. the VAE, on 128 x 128 crops of freshly drawn 256 x 256 scenes (L1, L1 of 8 x 8 block
   means for the colour of flat areas, a small KL term; ``--vae-precision bf16`` runs its
   forward passes under bfloat16 autocast, 1.8x faster on this CPU); its ``scaling_factor`` is then set so
   latents have unit standard deviation, and it is saved to ``WORK/vae``;
2. a pool of ``--scenes`` scenes is drawn and encoded once (latent means, ``(4, 32, 32)``);
   ``--one-shape-share`` gives that share of them a single shape; ``--pool-cache DIR`` keeps it
   there, so a later run on the same VAE and settings loads it instead (:mod:`.latent_pool`);
3. the UNet and the text encoder together, on v-prediction by default with the plain v loss
   (DDPM, 1000 scaled-linear steps rescaled to zero terminal SNR; ``--layout-share`` draws that
   share of the timesteps from the top 10 % of the schedule, where only the caption can place a
   shape), with 10 % of captions dropped to ``""`` so classifier-free guidance works; the
   weights saved are an exponential moving average, whose prompt fidelity (:mod:`.fidelity`,
   seed 0) is logged, and which is saved to ``WORK/checkpoints/step-N``, every ``--eval-every``
   steps. ``--unet-init`` starts this stage from the UNet and text encoder of a saved pipeline
   (a finished model or such a checkpoint) instead of random weights; ``--unet-stop-after N``
   trains only the first N steps of the ``--unet-steps`` schedule (what a longer run's step-N
   checkpoint holds, without the rest of that run).
   The saved scheduler is DDIM on the same betas with 'trailing' timesteps, so sampling starts
   from pure noise as training ended.

Each stage draws its scenes from its own random stream, so a run with ``--vae`` trains the UNet
on the same scenes as a run that trains its VAE.

``--work`` receives the log (``train.jsonl``), the loss curves (``loss.png``) and preview
samples; ``--out`` the finished ``StableDiffusionPipeline`` (safetensors). About 100 minutes on
2 cores with the defaults (``--vae`` reuses a saved VAE and skips stage 1; ``--vae-init`` starts
stage 1 from a saved VAE, to train one that missed the colour gate for longer, usually with a
lower ``--vae-lr``; ``--vae-only`` stops after stage 1). After the VAE stage it checks that
reconstructions keep the shapes' colours (``--min-vae-colours``) and stops there if not, rather
than train a UNet on bad latents. ``make train-demo`` runs the four-run recipe of the committed
weights (docs/MODELS.md, about 2 hours): ``--vae-only`` for 2000 bf16 steps; a run that trains the
UNet on that VAE; two runs that continue the UNet with ``--unet-init``, the first of them loading
the pool the run before it saved (``--pool-cache``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from ..builtin import DEMO_DIR

    p = argparse.ArgumentParser(prog="python -m pcpp_runtime.models.demo_training.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEMO_DIR, help="where the trained pipeline is saved (default %(default)s)")
    p.add_argument("--work", type=Path, default=Path("out/train-demo"), help="log, loss curve, previews")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device to train on (default %(default)s; e.g. cuda)")
    p.add_argument("--vae-steps", type=int, default=900)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae", type=Path, default=None,
                   help="a VAE folder saved by an earlier run (WORK/vae): skip the VAE stage and use it")
    p.add_argument("--vae-lr", type=float, default=1e-3,
                   help="peak learning rate of the VAE stage (default %(default)s; lower to continue a VAE given "
                        "with --vae-init)")
    p.add_argument("--vae-init", type=Path, default=None,
                   help="a VAE folder saved by an earlier run (WORK/vae) to start the VAE stage from instead of "
                        "random weights: more steps for a VAE that missed the colour gate")
    p.add_argument("--vae-precision", choices=("fp32", "bf16"), default="fp32",
                   help="arithmetic of the VAE stage's forward passes: bf16 runs them under bfloat16 autocast "
                        "(weights, optimiser and losses stay float32), about 1.8x faster on this project's CPUs (AVX-512 BF16) "
                        "(default %(default)s)")
    p.add_argument("--vae-only", action="store_true",
                   help="stop after the VAE stage (saved to WORK/vae, its colour check printed) whatever the gate "
                        "says, and exit 0: the first of two runs whose second continues it with --vae-init")
    p.add_argument("--unet-init", type=Path, default=None,
                   help="a pipeline folder saved by an earlier run (--out, or WORK/checkpoints/step-N) whose UNet "
                        "and text encoder start the UNet stage instead of random weights (learning-rate warm-up "
                        "and decay start over)")
    p.add_argument("--scenes", type=int, default=6000, help="scenes encoded for the UNet stage")
    p.add_argument("--pool-cache", type=Path, default=None,
                   help="a folder for encoded pools: a run loads the pool an earlier run with the same VAE, seed, "
                        "--scenes, --one-shape-share, device, threads, torch version and scene-drawing code saved there (bit for bit what it would "
                        "encode, about 5 minutes saved on 2 cores), and saves it there if there is none")
    p.add_argument("--unet-steps", type=int, default=4500)
    p.add_argument("--unet-stop-after", type=int, default=None,
                   help="train only the first this many steps of the --unet-steps schedule (its warm-up and decay "
                        "as for all of them) and save the weights averaged so far: what a longer run's "
                        "WORK/checkpoints/step-N holds, without the rest of that run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved UNet/text weights")
    p.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="v_prediction",
                   help="what the UNet learns to predict; saved in the scheduler config (default %(default)s)")
    p.add_argument("--min-snr", type=float, default=0.0,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023); 0 (the default) keeps the plain loss of "
                        "--prediction. With v-prediction, min-SNR all but switches off the high-noise steps that "
                        "place the shapes (see _loss_weights)")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=True,
                   help="rescale the betas so the last timestep is pure noise, and sample from it ('trailing' "
                        "timesteps), as Lin et al. 2024 propose; with Stable Diffusion's betas the last training "
                        "step still shows where the shapes are, so a model can learn to read places from its input "
                        "instead of the caption (default: on)")
    p.add_argument("--layout-share", type=float, default=0.0,
                   help="share of each batch whose timestep is drawn from the top 10 %% (t >= 900) instead of all "
                        "1000, where the input holds almost no trace of the picture and only the caption can say "
                        "where the shapes go. 0.5 did not make the place words learnt within 2000 steps, so the "
                        "default stays uniform (default %(default)s; docs/MODELS.md)")
    p.add_argument("--one-shape-share", type=float, default=0.0,
                   help="share of the pool's scenes drawn with exactly one shape; the rest have one to three "
                        "(default %(default)s: all one to three; 0.5 with --layout-share 0.5 had not learnt the "
                        "place words after 1000 steps, docs/MODELS.md)")
    p.add_argument("--eval-every", type=int, default=1000,
                   help="measure prompt fidelity (10 prompts, seed 0) of the averaged weights every this many "
                        "UNet steps, log it and save those weights to WORK/checkpoints/step-N; 0: never (default %(default)s)")
    p.add_argument("--min-vae-colours", type=float, default=0.8,
                   help="stop after the VAE stage unless its reconstructions keep this share of shape colours")
    args = p.parse_args(argv)
    if args.zero_terminal_snr and args.prediction == "epsilon":
        p.error("--prediction epsilon cannot be trained with --zero-terminal-snr (the noise is not "
                "recoverable from a pure-noise input): use --prediction v_prediction or --no-zero-terminal-snr")
    for name in ("layout_share", "one_shape_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be a share between 0 and 1, got {getattr(args, name)}")
    if args.vae is not None and args.vae_init is not None:
        p.error("--vae skips the VAE stage and --vae-init starts it from a saved VAE: give one of them")
    if args.vae_only and args.vae is not None:
        p.error("--vae-only trains a VAE and --vae skips that stage: give one of them")
    for name in ("vae", "vae_init"):
        folder = getattr(args, name)
        if folder is not None and not (folder / "config.json").is_file():
            p.error(f"--{name.replace('_', '-')} {folder}: no config.json there; give a VAE folder saved by an "
                    f"earlier run (WORK/vae)")
    if args.unet_init is not None:
        missing = [part for part in ("unet", "text_encoder") if not (args.unet_init / part / "config.json").is_file()]
        if missing:
            p.error(f"--unet-init {args.unet_init}: no {' or '.join(f'{m}/config.json' for m in missing)} there; give a "
                    f"pipeline folder saved by an earlier run (--out, or WORK/checkpoints/step-N)")
        if args.vae_only:
            p.error("--vae-only stops before the UNet stage that --unet-init starts: give one of them")
    if args.vae_only and args.pool_cache is not None:
        p.error("--vae-only stops before the UNet stage whose pool --pool-cache keeps: give one of them")
    if args.vae_only and args.unet_stop_after is not None:
        p.error("--vae-only stops before the UNet stage that --unet-stop-after cuts short: give one of them")
    if not args.vae_lr > 0:
        p.error(f"--vae-lr must be a positive learning rate, got {args.vae_lr}")
    if args.unet_stop_after is not None and not 1 <= args.unet_stop_after <= args.unet_steps:
        p.error(f"--unet-stop-after must be a step count from 1 to --unet-steps ({args.unet_steps}), got {args.unet_stop_after}")
    if args.unet_stop_after is None:
        args.unet_stop_after = args.unet_steps  # the UNet steps this run trains: all of the schedule
    if args.eval_every < 0:
        p.error(f"--eval-every must be 0 (never) or a step count, got {args.eval_every}")
    for name in ("vae_steps", "scenes", "unet_steps", "batch", "vae_batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def _lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _scene_batch(rng, count: int, size: int, one_shape_share: float = 0.0):
    """``count`` fresh scenes: images ``(count, 3, size, size)`` in [-1, 1] and their captions.
    With ``one_shape_share`` > 0 each scene has, with that probability, exactly one shape, else
    one to three (0 draws nothing extra, so the VAE stage's stream is as it was)."""
    import numpy as np
    import torch

    from .shapes import render, sample_scene

    def one():
        if one_shape_share > 0 and rng.random() < one_shape_share:
            return sample_scene(rng, max_shapes=1)
        return sample_scene(rng)

    scenes = [one() for _ in range(count)]
    images = np.stack([render(scene, size) for scene in scenes])
    return torch.from_numpy(images), [scene.caption for scene in scenes]


class _Log:
    """Appends one JSON line per record to ``train.jsonl`` and keeps the loss curves."""

    def __init__(self, work: Path):
        self.path = work / "train.jsonl"
        self.path.write_text("")
        self.curves: dict[str, list[tuple[int, float]]] = {}

    def __call__(self, stage: str, step: int, **values) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")
        if "loss" in values:
            self.curves.setdefault(stage, []).append((step, values["loss"]))

    def plot(self, target: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.curves), figsize=(5 * len(self.curves), 3.5), squeeze=False)
        for ax, (stage, points) in zip(axes[0], self.curves.items()):
            steps = [s for s, _ in points]
            losses = [v for _, v in points]
            ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
            k = max(1, len(losses) // 50)
            smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {k + 1}")
            ax.set_title(f"{stage} training loss")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.legend()
        fig.tight_layout()
        fig.savefig(target, dpi=100)
        plt.close(fig)


def _train_vae(vae, args, rng, log) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    # bf16: convolutions and attention in bfloat16, everything they feed (losses, the optimiser) in float32
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.vae_precision == "bf16")
    vae.train()
    bar = tqdm(range(args.vae_steps), desc="vae", unit="step", file=sys.stderr, mininterval=2.0)
    for step in bar:
        images, _ = _scene_batch(rng, args.vae_batch, 256)
        images = images.to(args.device)
        top, left = (int(v) * 8 for v in rng.integers(0, 17, size=2))  # 8-aligned 128 x 128 crop
        crops = images[:, :, top : top + 128, left : left + 128]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.vae_steps, args.vae_lr)
        with autocast:
            moments = vae.encode(crops).latent_dist.parameters
        posterior = DiagonalGaussianDistribution(moments.float())  # KL and the sample in float32
        with autocast:
            recon = vae.decode(posterior.sample()).sample.float()
        l1 = (recon - crops).abs().mean()
        # the mean colour of each 8 x 8 block: L1 alone lets flat areas drift in hue, which the
        # colour gate (and the fidelity check) then count as the wrong colour
        colour = (F.avg_pool2d(recon, 8) - F.avg_pool2d(crops, 8)).abs().mean()
        kl = posterior.kl().mean() / crops[0].numel()
        loss = l1 + colour + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, loss=loss.item(), l1=l1.item(), colour=colour.item(), kl=kl.item())
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if (step + 1) % 300 == 0 and step + 1 < args.vae_steps:  # progress of what the gate measures
            vae.eval()
            kept = _vae_colour_check(vae, np.random.default_rng([args.seed, 1]), args.device)
            vae.train()
            log("vae", step + 1, colours_kept=kept)
            bar.write(f"vae step {step + 1}: colours kept in {100 * kept:.0f} % of one-shape scenes")
    vae.eval()


def _vae_colour_check(vae, rng, device: str, count: int = 48) -> float:
    """Share of fresh one-shape scenes whose VAE reconstruction still shows the shape's colour
    as the strongest shape colour in its cell (:func:`.fidelity.check_image`):
    a VAE that loses colours cannot give a faithful model, whatever the UNet learns."""
    import numpy as np
    import torch

    from .fidelity import check_image
    from .shapes import render, sample_scene

    scenes = [sample_scene(rng, max_shapes=1) for _ in range(count)]
    images = torch.from_numpy(np.stack([render(scene) for scene in scenes]))
    with torch.no_grad():
        recon = vae.decode(vae.encode(images.to(device)).latent_dist.mean).sample.clamp(-1, 1).cpu().numpy()
    kept = [check_image(r, s.shapes[0].colour, s.shapes[0].position)[0] for r, s in zip(recon, scenes)]
    return sum(kept) / count


def _encode_pool(vae, args, rng):
    """Draw and encode ``args.scenes`` scenes: latents ``(N, 4, 32, 32)`` (scaled) and captions."""
    import torch
    from tqdm.auto import tqdm

    latents, captions = [], []
    with torch.no_grad():
        for start in tqdm(range(0, args.scenes, 64), desc="encode", unit="batch", file=sys.stderr, mininterval=2.0):
            images, texts = _scene_batch(rng, min(64, args.scenes - start), 256, args.one_shape_share)
            latents.append(vae.encode(images.to(args.device)).latent_dist.mean * vae.config.scaling_factor)
            captions.extend(texts)
    return torch.cat(latents), captions


def _pool(vae, args, rng):
    """The UNet stage's pool ``(latents, captions, cached)``: loaded from ``args.pool_cache``
    when an earlier run saved it there (``cached`` True), else encoded (and saved there if given)."""
    if args.pool_cache is None:
        return (*_encode_pool(vae, args, rng), False)
    import inspect

    from . import shapes
    from .latent_pool import load_pool, pool_key, save_pool

    code = "".join(inspect.getsource(part) for part in (shapes, _scene_batch, _encode_pool))
    key = pool_key(vae, seed=args.seed, scenes=args.scenes, one_shape_share=args.one_shape_share,
                   device=args.device, threads=args.threads, code=code)
    found = load_pool(args.pool_cache, key)
    if found is not None:
        print(f"pool: {len(found[1])} encoded scenes loaded from {args.pool_cache} (key {key})", flush=True)
        return (found[0].to(args.device), found[1], True)
    latents, captions = _encode_pool(vae, args, rng)
    print(f"pool: saved to {save_pool(args.pool_cache, key, latents, captions)}", flush=True)
    return latents, captions, False


def _set_scaling_factor(vae, rng, device: str) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / std of the latent means of 256 fresh scenes."""
    import torch

    with torch.no_grad():
        images, _ = _scene_batch(rng, 256, 256)
        images = images.to(device)
        means = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mean for i in range(0, 256, 64)])
    factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def _ema_update(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1 - decay)


def _loss_weights(snr, args):
    """Per-sample loss weights ``(B,)`` from the timesteps' SNR: all ones, or min-SNR-gamma's
    ``min(SNR, gamma) / SNR`` (noise prediction) and ``min(SNR, gamma) / (SNR + 1)`` (v prediction).

    Measured as error of the predicted clean latent ``x0``, the plain noise loss weighs a timestep
    by ``SNR``, the plain v loss by ``SNR + 1`` and min-SNR by ``min(SNR, gamma)``. So min-SNR caps
    the many low-noise steps, but it also leaves the high-noise steps (SNR down to 0.005 with
    these betas), where a sample's layout is decided, with almost no weight; the plain v loss
    keeps at least weight 1 there. Both runs trained with min-SNR drew clean shapes in the wrong
    places, hence the default ``--min-snr 0``; the plain v loss alone did not put them right
    either (docs/MODELS.md)."""
    import torch

    if args.min_snr <= 0:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=args.min_snr)
    return clipped / snr if args.prediction == "epsilon" else clipped / (snr + 1)


#: timesteps from here up are "layout" steps: with zero terminal SNR the signal-to-noise ratio is
#: under 0.003 there, too little to read a shape's place from the input (a shape's few hundred
#: latent values at amplitude sqrt(SNR) stay under the noise), so the caption has to say it
LAYOUT_FROM = 900


def _timesteps(count: int, layout_share: float, generator):
    """Training timesteps ``(count,)``: uniform over 0..999, except that each sample, with
    probability ``layout_share`` (0: never, and no further random draws), is drawn from
    ``LAYOUT_FROM``..999 instead.

    Uniform timesteps give the high-noise steps, where sampling decides the layout, 10 % of the
    samples. Whether more of them teaches the place words is not shown yet: a run with
    ``layout_share`` 0.5 had not learnt them after 2000 steps (docs/MODELS.md)."""
    import torch

    uniform = torch.randint(0, 1000, (count,), generator=generator)
    if layout_share <= 0:  # draws nothing more: the same stream as before the option existed
        return uniform
    layout = torch.randint(LAYOUT_FROM, 1000, (count,), generator=generator)
    chosen = torch.rand(count, generator=generator) < layout_share
    return torch.where(chosen, layout, uniform)


def _noise_schedule(zero_terminal_snr: bool):
    """The training noise schedule: DDPM, 1000 of Stable Diffusion's scaled-linear steps,
    rescaled to zero terminal SNR when asked."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, rescale_betas_zero_snr=zero_terminal_snr)


def _train_unet(unet, text_encoder, tokenizer, latents, captions, args, generator, log, evaluate=None):
    """Train ``unet`` and ``text_encoder`` together on ``args.prediction`` (noise or v) with
    ``_loss_weights``; returns their EMAs. Every ``args.eval_every`` steps ``evaluate(ema_unet,
    ema_text, steps_done)`` (a share of passed fidelity cases) is logged, when given."""
    import torch
    from tqdm.auto import tqdm

    noise_schedule = _noise_schedule(args.zero_terminal_snr)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    unet.to(memory_format=torch.channels_last)  # about 17 % faster convolutions on the CPU here
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    alphas = noise_schedule.alphas_cumprod.to(args.device)
    snr = alphas / (1 - alphas)  # signal-to-noise ratio of each training timestep
    unet.train()
    text_encoder.train()
    bar = tqdm(range(args.unet_stop_after), desc="unet", unit="step", file=sys.stderr, mininterval=2.0)
    for step in bar:
        index = torch.randint(0, latents.shape[0], (args.batch,), generator=generator)
        batch_ids = ids[index].clone()
        dropped = torch.rand(args.batch, generator=generator) < 0.1
        batch_ids[dropped] = empty[0]
        x0 = latents[index.to(latents.device)]
        noise = torch.randn(x0.shape, generator=generator).to(args.device)
        t = _timesteps(args.batch, args.layout_share, generator).to(args.device)
        noisy = noise_schedule.add_noise(x0, noise, t).contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.unet_steps, args.lr)
        context = text_encoder(batch_ids.to(args.device))[0]
        target = noise if args.prediction == "epsilon" else noise_schedule.get_velocity(x0, noise, t)
        error = (unet(noisy, t, context).sample - target).pow(2).mean(dim=(1, 2, 3))
        loss = (error * _loss_weights(snr[t], args)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        log("unet", step, loss=loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if evaluate is not None and (step + 1) % args.eval_every == 0:
            share = evaluate(ema_unet, ema_text, step + 1)
            log("unet", step + 1, fidelity=share)
            bar.write(f"unet step {step + 1}: prompt fidelity of the averaged weights {100 * share:.0f} % (seed 0)")
    return ema_unet.to(memory_format=torch.contiguous_format), ema_text


def _fidelity_now(unet, text_encoder, tokenizer, vae, scheduler) -> float:
    """Share of :data:`~.fidelity.FIDELITY_PROMPTS` that pass at seed 0 when
    ``unet`` and ``text_encoder`` (in training, on their device) are put in a pipeline."""
    from diffusers import StableDiffusionPipeline

    from .fidelity import measure

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    cases = measure(pipe, seeds=1)
    return sum(case.passed for case in cases) / len(cases)


def _preview(folder: Path, target: Path, seed: int, device: str) -> None:
    """Samples of a few captions from the saved pipeline, side by side, as a PNG."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(folder)).to(device)
    prompts = [
        "a red circle at the top left",
        "a blue square in the center",
        "a yellow triangle at the bottom right",
        "a green stripe on the left and a purple circle on the right",
    ]
    images = []
    for i, prompt in enumerate(prompts):
        out = pipe(prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(seed + i), output_type="np")
        images.append((out.images[0] * 255).round().astype(np.uint8))
    Image.fromarray(np.concatenate(images, axis=1)).save(target)


def main(argv: list[str] | None = None) -> int:
    if __package__ != "pcpp_runtime.models.demo_training":
        # run as `python -m models.demo_training.train` from the repository root, the UNet's class would be
        # models.positional_unet, and model_index.json would name a module no install has
        print(f"train_demo: run it as `python -m pcpp_runtime.models.demo_training.train` (here it was imported as "
              f"{__name__!r}): the saved model_index.json names the UNet's module by the path it was imported "
              f"from, and only pcpp_runtime.models.positional_unet loads", file=sys.stderr)
        return 2
    args = _parse(argv)
    import numpy as np
    import torch

    from ..tiny.unets import save_sd_pipeline
    from .components import demo_components, write_word_tokenizer

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = _Log(args.work)
    started = time.perf_counter()
    write_word_tokenizer(args.work / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(args.work / "tokenizer"))
    parts = demo_components(tokenizer, seed=args.seed)
    if args.unet_init is not None:
        from transformers import CLIPTextModel

        from ..positional_unet import PositionalUNet2DConditionModel

        parts["unet"] = PositionalUNet2DConditionModel.from_pretrained(str(args.unet_init / "unet"))
        parts["text_encoder"] = CLIPTextModel.from_pretrained(str(args.unet_init / "text_encoder"))
    for name in ("vae", "unet", "text_encoder"):
        parts[name].to(args.device)
    # one random stream per stage, so the pool of scenes is the same whether the VAE stage runs
    # or --vae skips it (the VAE's stream is the one all stages shared before 2026-11-28)
    vae_rng = np.random.default_rng(args.seed)
    check_rng, pool_rng = np.random.default_rng([args.seed, 1]), np.random.default_rng([args.seed, 2])

    if args.vae is None:
        if args.vae_init is not None:
            from diffusers import AutoencoderKL

            parts["vae"] = AutoencoderKL.from_pretrained(str(args.vae_init)).to(args.device)
        _train_vae(parts["vae"], args, vae_rng, log)
        factor = _set_scaling_factor(parts["vae"], vae_rng, args.device)
        parts["vae"].save_pretrained(str(args.work / "vae"))  # kept whatever the gate says
    else:
        from diffusers import AutoencoderKL

        parts["vae"] = AutoencoderKL.from_pretrained(str(args.vae)).to(args.device).eval()
        factor = parts["vae"].config.scaling_factor
    colours = _vae_colour_check(parts["vae"], check_rng, args.device)
    # a reused VAE (--vae) trained no steps in this run
    log("vae", 0 if args.vae is not None else args.vae_steps, scaling_factor=factor, colours_kept=colours,
        minutes=(time.perf_counter() - started) / 60)
    print(f"VAE: reconstructions keep the shape's colour in {100 * colours:.0f} % of one-shape scenes", flush=True)
    if args.vae_only:
        log.plot(args.work / "loss.png")
        return 0
    if colours < args.min_vae_colours:
        print(f"train_demo: stopping before the UNet stage: the VAE keeps colours in {100 * colours:.0f} % of scenes, "
              f"under --min-vae-colours {args.min_vae_colours:g}; a UNet trained on its latents cannot be faithful "
              f"(the VAE is in {args.work / 'vae'})", file=sys.stderr)
        return 1
    latents, captions, cached = _pool(parts["vae"], args, pool_rng)
    log("encode", 0, scenes=len(captions), first_caption=captions[0], cached=cached,
        minutes=(time.perf_counter() - started) / 60)

    from ..tiny.unets import sd_ddim_scheduler

    zero_snr = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing") if args.zero_terminal_snr else {}
    parts["scheduler"] = sd_ddim_scheduler(prediction_type=args.prediction, **zero_snr)
    generator = torch.Generator().manual_seed(args.seed)
    evaluate = None
    if args.eval_every:
        def evaluate(ema_unet, ema_text, step):
            share = _fidelity_now(ema_unet, ema_text, tokenizer, parts["vae"], parts["scheduler"])
            # the averaged weights so far, loadable like the finished pipeline (a run cut short keeps them)
            save_sd_pipeline(args.work / "checkpoints" / f"step-{step}", copy.deepcopy(ema_unet).to(memory_format=torch.contiguous_format),
                             ema_text, tokenizer, parts["scheduler"], vae=parts["vae"])
            return share
    unet, text_encoder = _train_unet(parts["unet"], parts["text_encoder"], tokenizer, latents, captions, args,
                                     generator, log, evaluate)
    log("unet", args.unet_stop_after, minutes=(time.perf_counter() - started) / 60)

    args.out.mkdir(parents=True, exist_ok=True)
    save_sd_pipeline(args.out, unet.cpu(), text_encoder.cpu(), tokenizer, parts["scheduler"], vae=parts["vae"].cpu())
    log.plot(args.work / "loss.png")
    _preview(args.out, args.work / "preview.png", args.seed, args.device)
    minutes = (time.perf_counter() - started) / 60
    log("done", 0, minutes=minutes)
    print(f"saved {args.out} in {minutes:.1f} min; loss curve {args.work / 'loss.png'}, samples {args.work / 'preview.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
