"""CFG parallel: the two halves of the guidance batch on two groups of ranks."""

from __future__ import annotations

import pytest
import torch

from pcpp_runtime import ConfigError, ParallelConfig
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.metrics import psnr

SPEC = JobSpec(steps=8, guidance_scale=5.0, seed=2)
SHAPE = (64, 48)


@pytest.fixture(scope="module")
def reference(tiny_sd):
    return tiny_sd.one_worker(SPEC, *SHAPE)


@pytest.mark.parametrize("world", [2, 4])
def test_cfg_parallel_sync_equals_one_worker(tiny_sd, reference, world):
    latents, _ = tiny_sd.on_ranks(world, ParallelConfig(policy="sync", cfg_split=True), SPEC, *SHAPE)
    for latent in latents:
        torch.testing.assert_close(latent, reference, rtol=1e-4, atol=1e-4)


def test_cfg_parallel_with_partial_saves_bytes_against_patch_only(tiny_sd, reference):
    config = dict(policy="partial", portion=0.3, warmup_steps=2)
    after = range(2, SPEC.steps)
    cfg_latents, cfg = tiny_sd.on_ranks(4, ParallelConfig(cfg_split=True, **config), SPEC, *SHAPE)
    _, patch = tiny_sd.on_ranks(4, ParallelConfig(**config), SPEC, *SHAPE)
    cfg_bytes = sum(w.runtime.ledger.per_step_mean(after)["total"] for w in cfg) / 4
    patch_bytes = sum(w.runtime.ledger.per_step_mean(after)["total"] for w in patch) / 4
    print(f"partial(0.3), 4 ranks: {cfg_bytes / 1e6:.3f} MB/step/rank with CFG parallel (2 groups x 2 strips), "
          f"{patch_bytes / 1e6:.3f} MB with patch-only (4 strips): {1 - cfg_bytes / patch_bytes:.0%} saved; "
          f"PSNR {psnr(cfg_latents[0], reference):.1f} dB")
    assert cfg_bytes < patch_bytes
    # transport and engine agree with CFG groups too (shared counters)
    for wrapped in cfg:
        assert wrapped.denoiser.transport.counters.payload_received == wrapped.runtime.ledger.total("received")


def test_cfg_parallel_on_an_odd_world_is_refused():
    with pytest.raises(ConfigError, match="world size must be even; got 3"):
        ParallelConfig(cfg_split=True).check_world_size(3)


def test_cfg_parallel_without_guidance_is_refused(tiny_sd):
    spec = JobSpec(steps=2, guidance_scale=1.0)
    with pytest.raises(Exception, match="CFG parallel needs classifier-free guidance"):
        tiny_sd.on_ranks(2, ParallelConfig(policy="sync", cfg_split=True), spec, *SHAPE)
