"""The shapes data set, the demo tokenizer, SSIM and `pcpp generate --grid` (no trained weights needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcpp_runtime.metrics import psnr, ssim
from pcpp_runtime.models.demo_training.fidelity import FIDELITY_PROMPTS, check_image
from pcpp_runtime.models.demo_training.shapes import (
    COLOURS,
    POSITIONS,
    Scene,
    Shape,
    caption_words,
    region_colour_shares,
    render,
    sample_scene,
    shape_phrase,
)


def test_scenes_are_reproducible_from_their_seed_and_captions_use_the_vocabulary():
    a = [sample_scene(np.random.default_rng(7)) for _ in range(1)]
    b = [sample_scene(np.random.default_rng(7)) for _ in range(1)]
    assert a == b
    rng = np.random.default_rng(0)
    words = set(caption_words())
    counts = {1: 0, 2: 0, 3: 0}
    for _ in range(300):
        scene = sample_scene(rng)
        counts[len(scene.shapes)] += 1
        assert set(scene.caption.split()) <= words, scene.caption
        assert len({s.position for s in scene.shapes}) == len(scene.shapes)  # one shape per cell
        assert len({s.colour for s in scene.shapes}) == len(scene.shapes)
    assert all(n > 50 for n in counts.values()), counts
    image = render(scene)
    assert image.shape == (3, 256, 256) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_large_shapes_cross_the_strip_boundaries_of_four_workers():
    """The data set is meant to put shapes across strip boundaries (rows 64, 128, 192 of 256)."""
    rng = np.random.default_rng(1)
    crossing = 0
    for _ in range(200):
        shape = sample_scene(rng, max_shapes=1).shapes[0]
        drawn = np.abs(render(Scene((shape,), ("white", "white"))) - render(Scene((), ("white", "white")))).sum(axis=0)
        rows = np.flatnonzero(drawn.sum(axis=1) > 0)
        if any(rows.min() < b <= rows.max() for b in (64, 128, 192)):
            crossing += 1
    assert crossing / 200 > 0.6, crossing


def test_region_check_finds_the_drawn_colour_in_its_cell_and_rejects_others():
    for colour, kind, cell in FIDELITY_PROMPTS:
        (row, col), _ = POSITIONS[cell]
        size = 0.08 if kind == "stripe" else 0.15
        shape = Shape(kind, colour, cell, ((row + 0.5) / 3, (col + 0.5) / 3), size)
        image = render(Scene((shape,), ("grey", "dark")))
        passed, share, strongest = check_image(image, colour, cell)
        assert passed and strongest == colour, (colour, kind, cell, share)
        # the same picture does not pass for another colour, nor for the opposite cell
        other = next(c for c in COLOURS if c != colour)
        assert not check_image(image, other, cell)[0]
        opposite = {(r, c): name for name, ((r, c), _) in POSITIONS.items()}[(2 - row, 2 - col)]
        if opposite != cell and kind != "stripe":
            assert not check_image(image, colour, opposite)[0]
    uint8 = ((render(Scene((Shape("circle", "red", "center", (0.5, 0.5), 0.2),), ("white", "white"))) + 1) * 127.5)
    shares = region_colour_shares(uint8.round().astype(np.uint8).transpose(1, 2, 0), "center")
    assert shares["red"] > 0.5 and max(v for k, v in shares.items() if k != "red") == 0.0


def test_place_probe_finds_the_centre_of_a_red_shape_in_grid_cells():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "place_probe.py"
    spec = importlib.util.spec_from_file_location("place_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for place, ((row, col), _) in POSITIONS.items():
        shapes = (Shape("circle", "red", place, ((row + 0.5) / 3, (col + 0.5) / 3), 0.1),
                  Shape("square", "blue", "center" if place != "center" else "top", (0.5, 0.5) if place != "center" else (1 / 6, 0.5), 0.1))
        image = ((render(Scene(shapes, ("grey", "white"))).transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
        centre = probe.red_centre(image)
        assert centre is not None and abs(centre[0] - (row + 0.5)) < 0.05 and abs(centre[1] - (col + 0.5)) < 0.05, (place, centre)
    blank = ((render(Scene((Shape("circle", "blue", "center", (0.5, 0.5), 0.2),), ("grey", "grey"))).transpose(1, 2, 0) + 1) * 127.5)
    assert probe.red_centre(blank.round().astype(np.uint8)) is None


def test_demo_tokenizer_spells_every_caption_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer

    from pcpp_runtime.models.demo_training.components import write_word_tokenizer

    write_word_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path))
    for word in caption_words():
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert len(tokenizer("an orange triangle at the bottom right").input_ids) == 2 + 7
    assert tokenizer.unk_token_id not in tokenizer("a pink dog").input_ids[1:-1]  # other words: characters
    assert shape_phrase("orange", "circle", "left") == "an orange circle on the left"


def test_ssim_and_psnr_of_images():
    torch.manual_seed(0)
    x = torch.rand(3, 64, 64)
    assert ssim(x, x) == pytest.approx(1.0)
    assert psnr(x, x, 1.0) == float("inf")
    values = [ssim((x + s * torch.randn_like(x)).clamp(0, 1), x) for s in (0.01, 0.05, 0.2)]
    # 0.9994, 0.985 and 0.818 measured (noise 0.01, 0.05, 0.2; float64, the seeded CPU generator)
    assert values[0] > values[1] > values[2] > 0.75, values
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(noisy, x) == pytest.approx(ssim(x, noisy))  # symmetric
    # a constant image against a shifted constant: structure term 1, luminance term < 1
    a, b = torch.full((1, 16, 16), 0.5), torch.full((1, 16, 16), 0.6)
    assert ssim(a, b) == pytest.approx((2 * 0.5 * 0.6 + 1e-4) / (0.25 + 0.36 + 1e-4))
    with pytest.raises(ValueError, match="one shape"):
        ssim(x, x[:, :32])


def _pcpp(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "pcpp_runtime.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_grid_writes_one_labelled_picture_and_a_report(tmp_path):
    from PIL import Image

    out, report = tmp_path / "grid.png", tmp_path / "grid.json"
    done = _pcpp("generate", "--model", "tiny-sd", "--grid", "--nproc", "2", "--steps", "4", "--warmup-steps", "1",
                 "--output", str(out), "--report", str(report))
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(report.read_text())
    labels = [run["label"] for run in data["runs"]]
    assert labels == ["1 worker", "sync", "full", "partial(0.3)", "none"]
    runs = {run["label"]: run for run in data["runs"]}
    # sync = one worker but for float32 rounding: 135.3 dB measured (torch 2.13 CPU); rounding
    # varies more between builds than an approximation's error, hence 10 dB of margin
    assert runs["sync"]["image_psnr_db"] is None or runs["sync"]["image_psnr_db"] > 125, runs["sync"]
    assert runs["none"]["mb_received_per_step"] < runs["partial(0.3)"]["mb_received_per_step"] < runs["full"]["mb_received_per_step"]
    image = Image.open(out)
    assert image.size[0] >= 5 * 192  # five tiles side by side
    assert "partial(0.3)" in done.stdout and str(out) in done.stdout


def test_generate_grid_refuses_a_process_transport_and_one_worker():
    done = _pcpp("generate", "--model", "tiny-sd", "--grid", "--transport", "zmq")
    assert done.returncode == 2 and "local transport" in done.stderr
    done = _pcpp("generate", "--model", "tiny-sd", "--grid", "--nproc", "1")
    assert done.returncode == 2 and "at least 2" in done.stderr


def test_pipelines_are_unwrapped_after_a_policy_run_and_give_the_same_result_again():
    from pcpp_runtime import ParallelConfig
    from pcpp_runtime.grid import run_one_worker, run_policy
    from pcpp_runtime.jobs import JobSpec
    from pcpp_runtime.pipelines import load_pipelines

    spec = JobSpec(model="tiny-sd", steps=4, seed=1)
    pipes = load_pipelines("tiny-sd", 2)
    reference = run_one_worker(pipes[0], spec)
    config = ParallelConfig(policy="partial", portion=0.3, warmup_steps=1)
    first = run_policy(pipes, spec, 2, config, "partial", reference)
    again = run_policy(pipes, spec, 2, config, "partial", reference)
    assert torch.equal(first.latents, again.latents)
    assert first.mb_per_step == again.mb_per_step > 0
    # and the unwrapped pipeline is one worker again
    assert torch.equal(run_one_worker(pipes[0], spec).latents, reference.latents)
    with pytest.raises(ValueError, match="4 pipeline\\(s\\) needed here"):
        run_policy(pipes, spec, 4, config, "partial", reference)


def _train_log(work):
    """The records of ``work/train.jsonl``, one dict per line."""
    return [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_demo_runs_end_to_end_and_stops_on_a_vae_that_loses_colours(tmp_path):
    """A few steps of each stage (not a useful model): the script saves a pipeline that loads
    through from_pretrained, and its colour gate stops a VAE that does not keep colours."""
    from diffusers import StableDiffusionPipeline

    from pcpp_runtime.models.demo_training.train import main as train

    tiny = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--unet-steps", "2", "--batch", "2", "--threads", "1"]
    assert train(tiny + ["--out", str(tmp_path / "gated"), "--work", str(tmp_path / "w1")]) == 1  # 2 steps: no colours
    assert not (tmp_path / "gated" / "model_index.json").exists()
    log = _train_log(tmp_path / "w1")
    assert any("colours_kept" in entry for entry in log)
    assert train(tiny + ["--min-vae-colours", "0", "--out", str(tmp_path / "m"), "--work", str(tmp_path / "w2")]) == 0
    log = _train_log(tmp_path / "w2")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"))
    assert pipe.unet.config.sample_size == 32 and pipe.vae.config.scaling_factor > 0
    assert (tmp_path / "w2" / "loss.png").stat().st_size > 0 and (tmp_path / "w2" / "preview.png").exists()

    # --vae reuses the saved VAE, skips its stage and trains on the same pool; fidelity is logged
    reuse = ["--vae", str(tmp_path / "w2" / "vae"), "--eval-every", "2", "--min-vae-colours", "0"]
    assert train(tiny + reuse + ["--out", str(tmp_path / "m3"), "--work", str(tmp_path / "w3")]) == 0
    log3 = _train_log(tmp_path / "w3")
    assert not any(entry["stage"] == "vae" and "loss" in entry for entry in log3)
    first = {name: next(e["first_caption"] for e in entries if "first_caption" in e) for name, entries in (("w2", log), ("w3", log3))}
    assert first["w2"] == first["w3"], first
    fidelity = [entry for entry in log3 if "fidelity" in entry]
    assert [entry["step"] for entry in fidelity] == [2] and 0.0 <= fidelity[0]["fidelity"] <= 1.0
    assert (tmp_path / "w3" / "checkpoints" / "step-2" / "model_index.json").exists()

    # --unet-init starts the UNet stage from that checkpoint: same pool, batch and noise as w3, so
    # only the starting weights can make its first UNet loss differ from w3's (random weights)
    from_checkpoint = ["--unet-init", str(tmp_path / "w3" / "checkpoints" / "step-2")]
    assert train(tiny + reuse + from_checkpoint + ["--out", str(tmp_path / "m5"), "--work", str(tmp_path / "w5")]) == 0
    first_unet_loss = {name: next(e["loss"] for e in _train_log(tmp_path / name) if e["stage"] == "unet" and "loss" in e)
                       for name in ("w3", "w5")}
    assert first_unet_loss["w3"] != first_unet_loss["w5"], first_unet_loss

    # --vae-init continues the saved VAE: on the same first batch its first loss differs from a fresh VAE's;
    # --vae-only stops after that stage with success although the gate (0.8 by default) fails
    vae_only = ["--vae-init", str(tmp_path / "w2" / "vae"), "--vae-only"]
    assert train(tiny + vae_only + ["--out", str(tmp_path / "m4"), "--work", str(tmp_path / "w4")]) == 0
    log4 = _train_log(tmp_path / "w4")
    assert (tmp_path / "w4" / "vae" / "config.json").exists() and (tmp_path / "w4" / "loss.png").exists()
    assert not (tmp_path / "m4" / "model_index.json").exists()
    kept = [e["colours_kept"] for e in log4 if "colours_kept" in e]
    assert len(kept) == 1 and kept[0] < 0.8 and not any(e["stage"] == "encode" for e in log4), kept
    first_vae_loss = {name: next(e["loss"] for e in _train_log(tmp_path / name) if e["stage"] == "vae" and "loss" in e)
                      for name in ("w1", "w2", "w4")}
    assert first_vae_loss["w1"] == first_vae_loss["w2"] != first_vae_loss["w4"], first_vae_loss


def test_train_demo_vae_stage_in_bf16_autocast_is_the_same_computation_and_keeps_float32(tmp_path):
    """--vae-precision bf16 runs the VAE's forward passes under bfloat16 autocast: from the same
    weights on the same first batch its first loss is not fp32's (so autocast is on) but close to
    it (so it is the same computation, rounded), and the weights it trains stay float32."""
    from diffusers import AutoencoderKL

    from pcpp_runtime.models.demo_training.train import _Log, _parse, _train_vae

    first = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
        args = _parse(["--vae-steps", "1", "--vae-batch", "2", "--vae-precision", precision])
        (tmp_path / precision).mkdir()
        _train_vae(vae, args, np.random.default_rng(0), _Log(tmp_path / precision))
        first[precision] = next(e["loss"] for e in _train_log(tmp_path / precision) if e["stage"] == "vae")
        assert {param.dtype for param in vae.parameters()} == {torch.float32}
    # bfloat16 keeps 8 significant bits (0.4 %); through an untrained VAE the rounding stays well
    # under 5 % of the loss, while a different batch or a broken loss would differ by far more
    assert first["fp32"] != first["bf16"] and abs(first["bf16"] - first["fp32"]) < 0.05 * first["fp32"], first


def test_train_demo_unet_stop_after_saves_what_the_longer_runs_checkpoint_holds(tmp_path, capsys):
    """--unet-steps 3 --unet-stop-after 2 trains the first two steps of the three-step schedule and
    saves those averaged weights: bit for bit the step-2 checkpoint of the whole three-step run
    (same VAE, pool and noise), and not its finished weights."""
    from safetensors.torch import load_file

    from pcpp_runtime.models.demo_training.train import main as train

    tiny = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--unet-steps", "3", "--batch", "2",
            "--threads", "1", "--min-vae-colours", "0"]
    assert train(tiny + ["--eval-every", "2", "--out", str(tmp_path / "whole"), "--work", str(tmp_path / "w1")]) == 0
    cut = ["--vae", str(tmp_path / "w1" / "vae"), "--unet-stop-after", "2", "--eval-every", "0"]
    assert train(tiny + cut + ["--out", str(tmp_path / "cut"), "--work", str(tmp_path / "w2")]) == 0
    assert len([e for e in _train_log(tmp_path / "w2") if e["stage"] == "unet" and "loss" in e]) == 2

    def weights(folder):
        return {**load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
                **{f"text.{k}": v for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items()}}

    cut_weights, checkpoint = weights(tmp_path / "cut"), weights(tmp_path / "w1" / "checkpoints" / "step-2")
    assert cut_weights.keys() == checkpoint.keys()
    assert all(torch.equal(cut_weights[k], checkpoint[k]) for k in checkpoint)
    whole = weights(tmp_path / "whole")
    assert not all(torch.equal(cut_weights[k], whole[k]) for k in whole)

    for bad in ("0", "4"):
        with pytest.raises(SystemExit):
            train(["--unet-steps", "3", "--unet-stop-after", bad])
        assert f"--unet-stop-after must be a step count from 1 to --unet-steps (3), got {bad}" in capsys.readouterr().err


def test_train_demo_pool_cache_gives_the_encoded_pool_back_bit_for_bit(tmp_path):
    """--pool-cache: the run that trains the VAE encodes its pool and saves it; a run on that VAE
    (--vae) loads it instead of encoding, and trains bit for bit the same weights; another
    --one-shape-share is another pool, encoded and saved beside the first."""
    from safetensors.torch import load_file

    from pcpp_runtime.models.demo_training.latent_pool import load_pool, save_pool
    from pcpp_runtime.models.demo_training.train import main as train

    tiny = ["--vae-steps", "2", "--vae-batch", "2", "--scenes", "8", "--unet-steps", "2", "--batch", "2",
            "--threads", "1", "--min-vae-colours", "0", "--eval-every", "0", "--pool-cache", str(tmp_path / "pools")]
    assert train(tiny + ["--out", str(tmp_path / "a"), "--work", str(tmp_path / "wa")]) == 0
    reuse = ["--vae", str(tmp_path / "wa" / "vae")]
    assert train(tiny + reuse + ["--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb")]) == 0
    cached = {name: next(e["cached"] for e in _train_log(tmp_path / name) if e["stage"] == "encode") for name in ("wa", "wb")}
    assert cached == {"wa": False, "wb": True}, cached
    assert len(list((tmp_path / "pools").glob("pool-*.safetensors"))) == 1

    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(tmp_path / "a" / unet)), load_file(str(tmp_path / "b" / unet))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    other = ["--one-shape-share", "0.5", "--unet-steps", "1"]
    assert train(tiny + reuse + other + ["--out", str(tmp_path / "c"), "--work", str(tmp_path / "wc")]) == 0
    assert not next(e["cached"] for e in _train_log(tmp_path / "wc") if e["stage"] == "encode")
    assert len(list((tmp_path / "pools").glob("pool-*.safetensors"))) == 2

    save_pool(tmp_path / "bad", "k", torch.zeros(2, 4, 32, 32), ["one caption"])
    with pytest.raises(ValueError, match="2 latents but 1 captions"):
        load_pool(tmp_path / "bad", "k")
    assert load_pool(tmp_path / "bad", "missing") is None


def test_train_demo_refuses_vae_together_with_vae_init_and_a_vae_lr_of_zero(capsys, tmp_path):
    from pcpp_runtime.models.demo_training.train import main as train

    with pytest.raises(SystemExit):
        train(["--vae", str(tmp_path), "--vae-init", str(tmp_path)])
    assert "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(["--vae", str(tmp_path), "--vae-only"])
    assert "give one of them" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(["--vae-init", str(tmp_path / "missing")])
    assert "--vae-init " + str(tmp_path / "missing") + ": no config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(["--unet-init", str(tmp_path)])
    assert f"--unet-init {tmp_path}: no unet/config.json or text_encoder/config.json there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(["--vae-lr", "0"])
    assert "--vae-lr must be a positive learning rate, got 0.0" in capsys.readouterr().err


def test_train_demo_draws_the_layout_share_of_timesteps_from_the_top_of_the_schedule():
    """--layout-share p: about p of the samples come from LAYOUT_FROM..999, the rest uniformly;
    p = 0 is plain uniform sampling, p = 1 never leaves the layout steps."""
    from pcpp_runtime.models.demo_training.train import LAYOUT_FROM, _timesteps

    count = 20000
    uniform = _timesteps(count, 0.0, torch.Generator().manual_seed(0))
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert abs((uniform >= LAYOUT_FROM).float().mean().item() - (1000 - LAYOUT_FROM) / 1000) < 0.01
    only_layout = _timesteps(count, 1.0, torch.Generator().manual_seed(0))
    assert only_layout.min() >= LAYOUT_FROM and only_layout.max() == 999
    half = _timesteps(count, 0.5, torch.Generator().manual_seed(0))
    expected = 0.5 + 0.5 * (1000 - LAYOUT_FROM) / 1000
    assert abs((half >= LAYOUT_FROM).float().mean().item() - expected) < 0.01
    assert torch.equal(half, _timesteps(count, 0.5, torch.Generator().manual_seed(0)))  # reproducible


def test_train_demo_refuses_to_run_under_another_import_path(capsys, monkeypatch):
    """Imported as ``models.demo_training.train`` (the repository root on sys.path), the pipeline it saved
    named ``models.positional_unet`` as the UNet's library, which no install can load: refused."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    stray = importlib.import_module("models.demo_training.train")
    # arguments the parser refuses, so without the check this fails at once instead of training
    assert stray.main(["--vae-lr", "0"]) == 2
    assert "run it as `python -m pcpp_runtime.models.demo_training.train`" in capsys.readouterr().err


def test_train_demo_refuses_a_layout_share_outside_0_to_1(capsys):
    from pcpp_runtime.models.demo_training.train import main as train

    with pytest.raises(SystemExit):
        train(["--layout-share", "1.5"])
    assert "--layout-share must be a share between 0 and 1, got 1.5" in capsys.readouterr().err


def test_place_learning_benchmark_trains_and_probes_all_nine_places(tmp_path):
    """Two steps on an untrained VAE (not a measurement): the script trains, then reports one red
    centre (or "no red") per place and noise."""
    from pcpp_runtime.models.demo_training.components import demo_components, write_word_tokenizer
    from transformers import CLIPTokenizer

    write_word_tokenizer(tmp_path / "tok")
    demo_components(CLIPTokenizer.from_pretrained(str(tmp_path / "tok")))["vae"].save_pretrained(str(tmp_path / "vae"))
    out = subprocess.run(
        [sys.executable, "benchmarks/place_learning.py", "--vae", str(tmp_path / "vae"), "--steps", "2",
         "--scenes", "64", "--threads", "1", "--work", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    assert "step 2 (" in out and "in the named cell" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith(("| place", "| ---"))]
    assert [row.split(" | ")[0][2:] for row in rows] == list(POSITIONS)
    assert all(len(row.split(" | ")) == 4 for row in rows)
    bad = subprocess.run([sys.executable, "benchmarks/place_learning.py", "--vae", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "holds no VAE" in bad.stderr


def test_train_demo_pool_draws_the_one_shape_share_and_leaves_the_plain_stream_alone():
    """--one-shape-share 1: every caption names one shape; 0: exactly the scenes sample_scene
    draws from the same stream (the VAE stage's scenes do not move); 0.5: about half plus the
    third of the rest that has one shape anyway."""
    from pcpp_runtime.models.demo_training.train import _scene_batch

    _, only_one = _scene_batch(np.random.default_rng(1), 40, 32, one_shape_share=1.0)
    assert all(" and " not in caption for caption in only_one)
    _, plain = _scene_batch(np.random.default_rng(1), 40, 32)
    rng = np.random.default_rng(1)
    assert plain == [sample_scene(rng).caption for _ in range(40)]
    _, mixed = _scene_batch(np.random.default_rng(1), 600, 8, one_shape_share=0.5)
    single = sum(" and " not in caption for caption in mixed) / len(mixed)
    assert 0.58 < single < 0.75, single  # expected 0.5 + 0.5 / 3 = 0.67
