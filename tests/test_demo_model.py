"""The trained built-in `demo` model: committed, loaded offline through `from_pretrained`, faithful
to its prompts, and good enough that the policies separate."""

from __future__ import annotations

import json

import pytest
import torch

from pcpp_runtime import ParallelConfig
from pcpp_runtime.grid import run_one_worker, run_policy
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.pipelines import load_pipeline, load_pipelines, resolve_model
from pcpp_runtime.models.builtin import DEMO_DIR
from pcpp_runtime.models.demo_training.fidelity import FIDELITY_PROMPTS, measure

# The weights are committed (made by `make train-demo`, about 2 hours); a checkout without them
# (models/demo deleted to retrain) skips these tests with that reason instead of failing.
pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / "model_index.json").exists(),
    reason=f"no trained demo weights in {DEMO_DIR}: run `make train-demo`",
)


def test_demo_weights_are_committed_small_and_load_through_from_pretrained():
    assert resolve_model("demo") == str(DEMO_DIR)
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pkl", ".ckpt")]  # no pickles
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    index = json.loads((DEMO_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = load_pipeline("demo")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.unet.config.sample_size * 8 >= 256  # images of 256 x 256 or larger


def test_prompt_fidelity_at_one_worker():
    """The colour a caption names dominates the cell it names in at least 80 % of cases."""
    pipe = load_pipelines("demo", 1)[0]
    cases = measure(pipe, seeds=1)
    passed = [case for case in cases if case.passed]
    report = "\n".join(f"{c.prompt!r} seed {c.seed}: share {c.share:.2f}, strongest {c.strongest}" for c in cases)
    assert len(cases) == len(FIDELITY_PROMPTS)
    assert len(passed) >= 0.8 * len(cases), report


@pytest.mark.slow
def test_policies_separate_on_the_trained_model():
    """On 4 workers, conditioning on no neighbour context scores clearly below full context, and
    partial conditioning's PSNR rises with the portion."""
    prompt = "a red circle at the top left and a blue square at the bottom and a yellow stripe in the center"
    spec = JobSpec(model="demo", prompt=prompt, steps=20, seed=0)
    pipes = load_pipelines("demo", 4)
    reference = run_one_worker(pipes[0], spec)
    runs = {}
    for label, config in [
        ("full", ParallelConfig(policy="full", warmup_steps=4)),
        ("partial(0.1)", ParallelConfig(policy="partial", portion=0.1, warmup_steps=4)),
        ("partial(0.5)", ParallelConfig(policy="partial", portion=0.5, warmup_steps=4)),
        ("none", ParallelConfig(policy="none", warmup_steps=4)),
    ]:
        runs[label] = run_policy(pipes, spec, 4, config, label, reference)
    psnr = {label: run.psnr_db for label, run in runs.items()}
    assert all(value is not None for value in psnr.values()), psnr
    # measured (torch 2.13 CPU): full 20.5 dB, partial(0.1) 16.13, partial(0.5) 16.16, none 13.7;
    # SSIM full 0.888, none 0.702
    assert psnr["none"] + 3.0 <= psnr["full"], psnr  # "clearly": at least 3 dB (6.8 measured)
    # the portion's effect on PSNR is small here (0.02 dB measured; SSIM 0.793 -> 0.806)
    assert psnr["partial(0.1)"] < psnr["partial(0.5)"], psnr
    assert runs["none"].ssim + 0.1 < runs["full"].ssim, (runs["none"].ssim, runs["full"].ssim)
    assert torch.isfinite(runs["none"].pixels).all()
