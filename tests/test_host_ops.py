"""Host work per denoiser call, pinned: a change that adds operators to the engine's steps shows here.

The counts come from ``pcpp_runtime.bench.host_ops.count_job_ops`` (the table of
``benchmarks/host_ops.py``): aten operators rank 0 dispatches per denoiser call, counted with a
TorchDispatchMode, on the benchmark model (``pcpp_runtime/bench/model.py``) at a 32x32 latent,
batch 1. They are deterministic for one torch version; the exact pins are torch 2.13's (the CPU
build ``make test`` installs), and other versions are held to the same ratios against the stock
UNet, within a few operators.
"""

from __future__ import annotations

import pytest
import torch

from pcpp_runtime.bench.host_ops import count_job_ops

#: (ranks, policy) -> non-view operators of (the stock UNet on rank 0's strip, a synchronous step,
#: a steady displaced step), measured with torch 2.13.0+cpu
PINNED = {
    (2, "partial"): (631, 1079, 1068),
    (4, "full"): (631, 1101, 1090),
}

#: the issue's targets in eager mode, as ratios against the stock UNet on the same strip; the
#: displaced step's is not met yet (1.69x and 1.73x measured): what is pinned is what holds
SYNC_TARGET = 2.0


@pytest.mark.parametrize("world, policy", list(PINNED))
def test_operators_per_call_are_pinned(world, policy):
    counts = count_job_ops("bench", 32, world, policy, 0.3)
    measured = (counts["stock"]["non_view"], counts["sync"]["non_view"], counts["displaced"]["non_view"])
    stock, sync, displaced = PINNED[(world, policy)]
    if torch.__version__.startswith("2.13."):
        assert measured == PINNED[(world, policy)], f"host work changed: {measured} (stock, sync, displaced), pinned {PINNED[(world, policy)]}"
    else:  # another torch dispatches its own decompositions: hold the ratios
        assert measured[1] / measured[0] <= sync / stock + 0.05 and measured[2] / measured[0] <= displaced / stock + 0.05, measured
    assert measured[1] <= SYNC_TARGET * measured[0]
