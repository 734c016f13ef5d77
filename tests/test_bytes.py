"""Bytes per step: the engine's counts, the transport's counts and the documented formula agree,
for a UNet (tiny-sd) and a transformer (tiny-dit)."""

from __future__ import annotations

import pytest
import torch

from pcpp_runtime import ParallelConfig
from pcpp_runtime.formulas import expected_bytes_per_step, probe_layer_shapes
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.models.plans import plan_for

SPEC = JobSpec(steps=6, guidance_scale=5.0, seed=1)
HEIGHT, WIDTH = 64, 48  # tiny-sd's latent 32 x 24
WARMUP = 2


@pytest.fixture(scope="module")
def shapes(tiny_sd):
    pipe = tiny_sd.pipeline()
    unet = pipe.unet
    plan = plan_for(unet)
    batch = 2  # guidance doubles the batch
    sample = torch.zeros(batch, 4, HEIGHT // 2, WIDTH // 2)
    text = torch.zeros(batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    return plan, probe_layer_shapes(unet, plan, sample, torch.tensor(10), encoder_hidden_states=text)


def check_bytes_per_step(wrapped: list, model_plan, layer_shapes, config: ParallelConfig) -> None:
    """Every rank received, step by step and kind by kind, what the formula says, and its
    transport counted exactly what the engine posted."""
    for rank, pipe in enumerate(wrapped):
        runtime = pipe.runtime
        assert runtime.num_steps == SPEC.steps
        for step in range(runtime.num_steps):
            expected = expected_bytes_per_step(
                layer_shapes, runtime.plan, model_plan, config, rank, step, runtime.num_steps,
                runtime.is_synchronous(step), batch=2, element_size=4,
            )
            measured = runtime.ledger.received.get(step, {})
            for kind in ("attention_kv", "halo", "norm", "output"):
                assert measured.get(kind, 0) == expected[kind], f"rank {rank} step {step} {kind}"
        assert pipe.denoiser.transport.counters.payload_received == runtime.ledger.total("received")
        assert pipe.denoiser.transport.counters.payload_sent == runtime.ledger.total("sent")


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("policy", ["sync", "full", "partial", "none"])
def test_bytes_per_step_match_the_formula(tiny_sd, shapes, world, policy):
    model_plan, layer_shapes = shapes
    config = ParallelConfig(policy=policy, portion=0.3, warmup_steps=WARMUP)
    _, wrapped = tiny_sd.on_ranks(world, config, SPEC, HEIGHT, WIDTH)
    check_bytes_per_step(wrapped, model_plan, layer_shapes, config)


@pytest.mark.parametrize("policy", ["sync", "partial"])
def test_dit_bytes_per_step_match_the_formula(builtin_model, policy):
    """A transformer too (attention at the patch grid: resolution factor 2; no halos, no norms),
    on 3 ranks of a 16x16 latent (8x8 patches)."""
    dit = builtin_model("tiny-dit")
    model = dit.pipeline().transformer
    model_plan = plan_for(model)
    layer_shapes = probe_layer_shapes(
        model, model_plan, torch.zeros(2, 4, 16, 16), timestep=torch.tensor([10, 10]), class_labels=torch.tensor([1, 1000])
    )
    config = ParallelConfig(policy=policy, portion=0.3, warmup_steps=WARMUP)
    _, wrapped = dit.on_ranks(3, config, SPEC, 32, 32)
    check_bytes_per_step(wrapped, model_plan, layer_shapes, config)


def test_partial_sends_a_quarter_of_full_attention_bytes_on_four_ranks(tiny_sd):
    full = tiny_sd.on_ranks(4, ParallelConfig(policy="full", warmup_steps=WARMUP), SPEC, HEIGHT, WIDTH)[1]
    partial = tiny_sd.on_ranks(4, ParallelConfig(policy="partial", portion=0.3, warmup_steps=WARMUP), SPEC, HEIGHT, WIDTH)[1]
    after = range(WARMUP, SPEC.steps)
    for rank in range(4):
        kv_full = full[rank].runtime.ledger.per_step_mean(after)["attention_kv"]
        kv_partial = partial[rank].runtime.ledger.per_step_mean(after)["attention_kv"]
        print(f"rank {rank}: KV bytes per step full {kv_full:.0f}, partial(0.3) {kv_partial:.0f}")
        assert kv_partial <= 0.25 * kv_full
        # buffers sized by what is asked for: stale KV memory shrinks too
        assert partial[rank].denoiser.stale_buffer_bytes()["attention_kv"] < full[rank].denoiser.stale_buffer_bytes()["attention_kv"]
