"""Bytes per step: the engine's counts, the transport's counts and the documented formula agree."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import on_ranks, quiet_pipeline
from pcpp_runtime import ParallelConfig
from pcpp_runtime.formulas import expected_bytes_per_step, probe_layer_shapes
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.models.plans import plan_for

SPEC = JobSpec(steps=6, guidance_scale=5.0, seed=1)
HEIGHT, WIDTH = 64, 48  # latent 32 x 24
WARMUP = 2


@pytest.fixture(scope="module")
def shapes(tiny_sd_path):
    pipe = quiet_pipeline(tiny_sd_path)
    unet = pipe.unet
    plan = plan_for(unet)
    batch = 2  # guidance doubles the batch
    sample = torch.zeros(batch, 4, HEIGHT // 2, WIDTH // 2)
    text = torch.zeros(batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    return plan, probe_layer_shapes(unet, plan, sample, torch.tensor(10), encoder_hidden_states=text)


def _run(tiny_sd_path, world, config):
    return on_ranks(tiny_sd_path, world, config, SPEC, HEIGHT, WIDTH)[1]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("policy", ["sync", "full", "partial", "none"])
def test_bytes_per_step_match_the_formula(tiny_sd_path, shapes, world, policy):
    model_plan, layer_shapes = shapes
    config = ParallelConfig(policy=policy, portion=0.3, warmup_steps=WARMUP)
    wrapped = _run(tiny_sd_path, world, config)
    for rank, pipe in enumerate(wrapped):
        runtime = pipe.runtime
        for step in range(runtime.num_steps):
            expected = expected_bytes_per_step(
                layer_shapes, runtime.plan, model_plan, config, rank, step, runtime.num_steps,
                runtime.is_synchronous(step), batch=2, element_size=4,
            )
            measured = runtime.ledger.received.get(step, {})
            for kind in ("attention_kv", "halo", "norm", "output"):
                assert measured.get(kind, 0) == pytest.approx(expected[kind], rel=0.01, abs=0), (
                    f"rank {rank} step {step} {kind}"
                )
        # the transport counted exactly what the engine posted
        assert pipe.denoiser.transport.counters.payload_received == runtime.ledger.total("received")
        assert pipe.denoiser.transport.counters.payload_sent == runtime.ledger.total("sent")


def test_partial_sends_a_quarter_of_full_attention_bytes_on_four_ranks(tiny_sd_path):
    full = _run(tiny_sd_path, 4, ParallelConfig(policy="full", warmup_steps=WARMUP))
    partial = _run(tiny_sd_path, 4, ParallelConfig(policy="partial", portion=0.3, warmup_steps=WARMUP))
    after = range(WARMUP, SPEC.steps)
    for rank in range(4):
        kv_full = full[rank].runtime.ledger.per_step_mean(after)["attention_kv"]
        kv_partial = partial[rank].runtime.ledger.per_step_mean(after)["attention_kv"]
        print(f"rank {rank}: KV bytes per step full {kv_full:.0f}, partial(0.3) {kv_partial:.0f}")
        assert kv_partial <= 0.25 * kv_full
        # buffers sized by what is asked for: stale KV memory shrinks too
        assert partial[rank].denoiser.stale_buffer_bytes()["self_attention"] < full[rank].denoiser.stale_buffer_bytes()["self_attention"]
