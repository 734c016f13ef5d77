"""Coalesced stale context (pcpp_runtime.staging): batches cut alike on both sides, same numerics."""

from __future__ import annotations

import pytest
import torch

from pcpp_runtime import ParallelConfig
from pcpp_runtime.config import ConfigError
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.staging import StagedMessages
from pcpp_runtime.threads import run_in_threads

# (shape, dtype) of one step's messages from rank 0 to rank 1, in posting order: 40, 8, 2, 16,
# 4000 and 24 bytes
MESSAGES = [((10,), torch.float32), ((2, 2), torch.float16), ((1,), torch.int16), ((2,), torch.int64),
            ((1000,), torch.float32), ((3, 2), torch.float32)]


def _payload(i: int, shape, dtype) -> torch.Tensor:
    return (torch.arange(torch.Size(shape).numel()) + 100 * i).reshape(shape).to(dtype)


def test_batches_arrive_intact_and_fewer_messages_are_sent() -> None:
    """64-byte batches: [40 + 8 + 2 + 16], then the 4000-byte message on its own and uncopied,
    then [24] at the end of the step: three transport messages carry six, and every receive
    buffer gets exactly its own bytes."""

    def rank(transport):
        staged = StagedMessages(transport, flush_bytes=64, tag=4)
        if transport.rank == 0:
            sends = [staged.send(_payload(i, s, d), 1, f"message {i}") for i, (s, d) in enumerate(MESSAGES)]
            assert [w.is_completed() for w in sends] == [True] * 5 + [False]  # the last is still queued
            staged.flush()
            staged.drain()
            assert staged.copied_bytes == 40 + 8 + 2 + 16 + 24
            return transport.counters.messages_sent
        buffers = [torch.full(s, -1).to(d) for s, d in MESSAGES]
        works = [staged.recv(b, 0, f"message {i}") for i, b in enumerate(buffers)]
        staged.flush()
        for work in reversed(works):  # any order: the first wait on a batch scatters all of it
            work.wait(10)
        for i, (buf, (shape, dtype)) in enumerate(zip(buffers, MESSAGES)):
            assert torch.equal(buf, _payload(i, shape, dtype)), i
        return transport.counters.messages_received

    sent, received = run_in_threads(2, rank, timeout_s=30)
    assert sent == received == 3


def test_a_send_waited_on_before_its_step_ended_says_so() -> None:
    def rank(transport):
        staged = StagedMessages(transport, flush_bytes=1 << 20, tag=4)
        if transport.rank == 0:
            work = staged.send(torch.zeros(4), 1, "halo layer 'up.0'")
            with pytest.raises(RuntimeError, match="halo layer 'up.0'.*before the step that posted it ended"):
                work.wait()
            staged.flush()
            work.wait()
            staged.drain()
        else:
            work = staged.recv(torch.empty(4), 0, "halo layer 'up.0'")
            with pytest.raises(RuntimeError, match="before its batch was posted"):
                work.wait()
            staged.flush()
            work.wait(10)
        return True

    assert run_in_threads(2, rank, timeout_s=30) == [True, True]


def test_coalesce_bytes_is_checked() -> None:
    with pytest.raises(ConfigError, match="coalesce_bytes must be an integer >= 0"):
        ParallelConfig(coalesce_bytes=-1)
    with pytest.raises(ConfigError, match="coalesce_bytes"):
        ParallelConfig(coalesce_bytes=1.5)


@pytest.mark.parametrize("world, policy", [(2, "partial"), (3, "full")])
def test_coalescing_changes_no_number_and_no_byte(tiny_sd, world, policy) -> None:
    """The same generation with one transport message per layer message and with batches of at
    least 4 KiB: bit-identical latents, the same bytes, fewer transport messages."""
    spec = JobSpec(steps=5, guidance_scale=5.0, seed=3)
    runs = {}
    for coalesce in (0, 4096):
        config = ParallelConfig(policy=policy, portion=0.3, warmup_steps=2, coalesce_bytes=coalesce)
        latents, wrapped = tiny_sd.on_ranks(world, config, spec, 64, 48)
        counters = [w.denoiser.transport.counters for w in wrapped]
        runs[coalesce] = (latents, [c.payload_received for c in counters], [c.messages_received for c in counters])
    (plain, plain_bytes, plain_msgs), (batched, batched_bytes, batched_msgs) = runs[0], runs[4096]
    for rank in range(world):
        assert torch.equal(plain[rank], batched[rank]), rank
    assert plain_bytes == batched_bytes
    assert all(b < p for b, p in zip(batched_msgs, plain_msgs)), (batched_msgs, plain_msgs)
