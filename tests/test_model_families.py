"""Model families beyond tiny-sd: SD 1.x with a learnt position embedding (the demo model's UNet
class), SD 2.x, SDXL, DiT, PixArt -- each split over in-process ranks and compared with one
worker, through the family's own diffusers pipeline.

* ``sync`` on 2 and 3 ranks equals one worker (final latent, 8 steps, guidance on: batch 2);
* ``full`` and ``partial(0.3)`` run end to end; their PSNR against one worker is printed and
  held to the measured value;
* DiT: 3 and 5 ranks (5 gives uneven strips of 2 and 1 patch rows), and a non-square latent
  through the bare transformer; PixArt: a non-square image through its pipeline, and the
  PixArt-sigma pipeline on the same components;
* schedulers: DDIM, Euler, Euler ancestral and DPM-Solver++ (multistep) on tiny-sd;
* an unknown denoiser class is refused with the list of supported families.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from pcpp_runtime import ParallelConfig, parallelize
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.metrics import psnr
from pcpp_runtime.pipelines import call_pipeline, check_shape, class_label, denoiser_of
from pcpp_runtime.models.plans import LayerRule, UnsupportedModelError, plan_for
from pcpp_runtime.partition import ShapeError
from pcpp_runtime.threads import run_in_threads
from pcpp_runtime.transports import LocalFabric

SPEC = JobSpec(steps=8, guidance_scale=5.0, seed=3)
#: family -> image size in pixels (the VAEs halve it: 32x32 latents for the UNets, 16x16 for
#: the transformers, whose 2x2 patches make an 8x8 token grid)
FAMILIES = {"tiny-sd-pos": (64, 64), "tiny-sd2": (64, 64), "tiny-sdxl": (64, 64), "tiny-dit": (32, 32), "tiny-pixart": (32, 32)}
TOLERANCE = dict(rtol=1e-4, atol=1e-4)
#: PSNR in dB of ``full`` and ``partial(0.3)`` against one worker on 2 ranks (2 warm-up steps of
#: 8), as measured (torch 2.13 CPU); the test asserts 5 dB under each. Random weights keep the
#: attention's share of the output small, hence values far above a trained model's.
APPROXIMATE_PSNR_DB = {
    ("tiny-sd-pos", "full"): 53.7, ("tiny-sd-pos", "partial"): 53.6,
    ("tiny-sd2", "full"): 43.0, ("tiny-sd2", "partial"): 42.6,
    ("tiny-sdxl", "full"): 52.7, ("tiny-sdxl", "partial"): 52.7,
    ("tiny-dit", "full"): 69.9, ("tiny-dit", "partial"): 65.7,
    ("tiny-pixart", "full"): 86.0, ("tiny-pixart", "partial"): 80.0,
}

_references: dict = {}


def reference(key, model, shape: tuple[int, int], spec: JobSpec = SPEC, **load) -> torch.Tensor:
    """One worker's final latent, computed once per key (``load``: see ``BuiltinModel``)."""
    if key not in _references:
        _references[key] = model.one_worker(spec, *shape, **load)
    return _references[key]


def assert_all_equal_one_worker(latents, expected) -> None:
    for rank_latent in latents:
        torch.testing.assert_close(rank_latent, expected, **TOLERANCE)
    assert all(torch.equal(latents[0], other) for other in latents[1:])


# ---------------------------------------------------------------------- every family
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sync_equals_one_worker(builtin_model, family, world):
    model, shape = builtin_model(family), FAMILIES[family]
    latents, _ = model.on_ranks(world, ParallelConfig(policy="sync"), SPEC, *shape)
    assert_all_equal_one_worker(latents, reference(family, model, shape))


@pytest.mark.parametrize("policy", ["full", "partial"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_approximate_policies_run_and_report_psnr(builtin_model, family, policy):
    model, shape = builtin_model(family), FAMILIES[family]
    latents, _ = model.on_ranks(2, ParallelConfig(policy=policy, portion=0.3, warmup_steps=2), SPEC, *shape)
    value = psnr(latents[0], reference(family, model, shape))
    print(f"{family} {policy}: PSNR {value:.2f} dB against one worker")
    assert APPROXIMATE_PSNR_DB[family, policy] - 5.0 < value < float("inf")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_world_size_one_is_bit_identical(builtin_model, family):
    model, shape = builtin_model(family), FAMILIES[family]
    wrapped = parallelize(model.pipeline(), LocalFabric(1).transport(0), ParallelConfig(policy="partial"))
    assert torch.equal(call_pipeline(wrapped, SPEC, *shape), reference(family, model, shape))


def test_plans_of_the_families(builtin_model):
    """What each plan splits: UNets as before; transformers by patch embedding + attn1, aligned
    to the patch size, gathering both halves of a learned-sigma output."""
    for family in ("tiny-sd-pos", "tiny-sd2", "tiny-sdxl"):
        plan = plan_for(denoiser_of(builtin_model(family).pipeline()))
        assert plan.family == "sd-unet" and plan.alignment == 4 and plan.strip_forward is None
    positional = plan_for(denoiser_of(builtin_model("tiny-sd-pos").pipeline()))
    assert positional.layers[:2] == (LayerRule("conv_in.0", "first_conv"), LayerRule("conv_in.1", "position_embedding"))
    sdxl = plan_for(denoiser_of(builtin_model("tiny-sdxl").pipeline()))
    assert "mid_block.attentions.0.transformer_blocks.1.attn1" in sdxl.paths("self_attention")
    for family, name in (("tiny-dit", "dit"), ("tiny-pixart", "pixart")):
        plan = plan_for(denoiser_of(builtin_model(family).pipeline()))
        assert plan.family == name and plan.alignment == 2 and plan.output_channels == 8
        assert plan.paths("patch_embed") == ["pos_embed"]
        assert plan.paths("self_attention") == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        assert {rule.kind for rule in plan.layers} == {"patch_embed", "self_attention"}


def test_position_embedding_off_its_table_size_gives_each_strip_its_rows(builtin_model):
    """A 48 x 32 latent (the table is 32 x 32, so it is resized) on 3 ranks: ``sync`` still
    equals one worker, so each strip got its rows of the full latent's resized table."""
    model, shape = builtin_model("tiny-sd-pos"), (96, 64)
    latents, _ = model.on_ranks(3, ParallelConfig(policy="sync"), SPEC, *shape)
    assert_all_equal_one_worker(latents, reference("tiny-sd-pos-96x64", model, shape))


# ---------------------------------------------------------------------- DiT / PixArt specifics
@pytest.mark.parametrize("world", [3, 5])
def test_dit_sync_on_three_and_five_ranks(builtin_model, world):
    model, shape = builtin_model("tiny-dit"), FAMILIES["tiny-dit"]
    latents, _ = model.on_ranks(world, ParallelConfig(policy="sync"), SPEC, *shape)
    assert_all_equal_one_worker(latents, reference("tiny-dit", model, shape))


@pytest.mark.parametrize("world", [3, 5])
def test_dit_transformer_on_a_non_square_latent(builtin_model, world):
    """DiTPipeline only makes square images, and diffusers' DiT forward only unpatchifies square
    token grids; the one-worker reference is that forward with the grid taken from the input
    (the plan's ``dit_strip_forward``, equal to the library's on square grids: see below). A
    20x12 latent (10x6 patches: positional embeddings recomputed, not the stored 8x8 table)
    through a DDIM loop that passes the latent as ``hidden_states=``; batch of two classes."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from pcpp_runtime.models.plans.dit import dit_strip_forward

    path = builtin_model("tiny-dit").path
    steps = 8
    torch.manual_seed(0)
    start = torch.randn(2, 4, 20, 12)
    labels = torch.tensor([3, 999])

    def sample(denoiser):
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        scheduler.set_timesteps(steps)
        x = start
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = denoiser(hidden_states=x, timestep=t.expand(2), class_labels=labels).sample
                assert out.shape == (2, 8, 20, 12)
                x = scheduler.step(out[:, :4], t, x).prev_sample
        return x

    single = DiTTransformer2DModel.from_pretrained(path, subfolder="transformer")
    single.forward = types.MethodType(dit_strip_forward, single)
    expected = sample(single)
    models = [DiTTransformer2DModel.from_pretrained(path, subfolder="transformer") for _ in range(world)]

    def rank(transport):
        model = models[transport.rank]
        denoiser = parallelize(model, transport, ParallelConfig(policy="sync"), num_steps=steps)
        assert "forward" in vars(model)  # the plan's strip-aware forward while applied
        result = sample(denoiser)
        denoiser.remove()
        assert "forward" not in vars(model)
        return result

    assert_all_equal_one_worker(run_in_threads(world, rank, timeout_s=120), expected)


def test_dit_strip_forward_is_the_library_forward_on_square_grids(builtin_model):
    from diffusers import DiTTransformer2DModel

    from pcpp_runtime.models.plans.dit import dit_strip_forward

    model = DiTTransformer2DModel.from_pretrained(builtin_model("tiny-dit").path, subfolder="transformer")
    torch.manual_seed(1)
    x, t, labels = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.tensor([1, 1000])
    with torch.no_grad():
        expected = model(x, timestep=t, class_labels=labels).sample
        ours = dit_strip_forward(model, x, timestep=t, class_labels=labels, return_dict=False)[0]
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("world", [2, 3])
def test_pixart_non_square_image(builtin_model, world):
    model, shape = builtin_model("tiny-pixart"), (32, 48)  # a 16x24 latent, 8x12 patches
    latents, _ = model.on_ranks(world, ParallelConfig(policy="sync"), SPEC, *shape)
    assert latents[0].shape == (1, 4, 16, 24)
    assert_all_equal_one_worker(latents, reference(("tiny-pixart", shape), model, shape))


def test_pixart_sigma_pipeline(builtin_model):
    from diffusers import PixArtSigmaPipeline

    model, shape, sigma = builtin_model("tiny-pixart"), FAMILIES["tiny-pixart"], {"pipeline_class": PixArtSigmaPipeline}
    latents, _ = model.on_ranks(2, ParallelConfig(policy="sync"), SPEC, *shape, **sigma)
    assert_all_equal_one_worker(latents, reference("tiny-pixart-sigma", model, shape, **sigma))


def test_dit_class_labels_and_native_size(builtin_model):
    pipe = builtin_model("tiny-dit").pipeline()
    assert class_label(pipe, "207") == 207
    assert class_label(pipe, "a red circle") == class_label(pipe, " a red circle ") < 1000
    with pytest.raises(ValueError, match="classes 0 to 999"):
        class_label(pipe, "1000")
    with pytest.raises(ShapeError, match="only its native 32x32 px"):
        check_shape(pipe, 32, 48, 2, ParallelConfig())
    check_shape(pipe, 32, 32, 5, ParallelConfig())


# ---------------------------------------------------------------------- schedulers, refusals
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpm++"])
def test_schedulers_sync_equals_one_worker_on_tiny_sd(tiny_sd, scheduler):
    spec, shape = dataclasses.replace(SPEC, scheduler=scheduler), (64, 64)
    latents, _ = tiny_sd.on_ranks(2, ParallelConfig(policy="sync"), spec, *shape)
    assert_all_equal_one_worker(latents, reference(("tiny-sd", scheduler), tiny_sd, shape, spec))


def test_unknown_model_class_is_refused_with_the_supported_list():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(UnsupportedModelError) as info:
        plan_for(model)
    message = str(info.value)
    assert "no plan for a Linear" in message
    for name in ("UNet2DConditionModel", "DiTTransformer2DModel", "PixArtTransformer2DModel", "docs/MODELS.md"):
        assert name in message
    with pytest.raises(UnsupportedModelError, match="supported: UNet2DConditionModel"):
        parallelize(model, LocalFabric(2).transport(0), ParallelConfig(), num_steps=1)


def test_pcpp_generate_with_tiny_dit(builtin_model, tmp_path, capsys):
    """`pcpp generate --model tiny-dit` (in process): the prompt names the class."""
    import json

    from pcpp_runtime.cli import main

    builtin_model("tiny-dit")  # built into the session's cache before the command looks for it

    image, report = tmp_path / "dit.png", tmp_path / "dit.json"
    code = main(["generate", "--model", "tiny-dit", "--prompt", "207", "--nproc", "3", "--steps", "4",
                 "--warmup-steps", "2", "--policy", "partial", "--compare", "--output", str(image), "--report", str(report)])
    assert code == 0
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    assert data["world_size"] == 3 and (data["height"], data["width"]) == (32, 32)
    # partial(0.3) after 2 warm-up steps of 4: 71.8 dB measured (torch 2.13 CPU)
    assert data["psnr_db"] > 66, data["psnr_db"]
    assert data["engine_bytes_received"] == data["transport_bytes_received"]
    assert "vs one worker" in capsys.readouterr().out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cfg_parallel_sync_equals_one_worker(builtin_model, family):
    """CFG parallel on 2 ranks: per-sample conditioning (SDXL's added_cond_kwargs, DiT's class
    labels, PixArt's masks) is split with the batch."""
    model, shape = builtin_model(family), FAMILIES[family]
    latents, _ = model.on_ranks(2, ParallelConfig(policy="sync", cfg_split=True), SPEC, *shape)
    assert_all_equal_one_worker(latents, reference(family, model, shape))
