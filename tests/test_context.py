"""The stale context between steps (pcpp_runtime.context): slices at fixed addresses, messages cut
alike on both sides, no transport call and no host synchronisation inside a displaced layer."""

from __future__ import annotations

import threading

import pytest
import torch

from pcpp_runtime import ParallelConfig, parallelize
from pcpp_runtime.accounting import ByteLedger
from pcpp_runtime.bench.host_ops import OpCounter
from pcpp_runtime.config import ConfigError
from pcpp_runtime.context import StaleContext
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.pipelines import call_pipeline
from pcpp_runtime.threads import run_in_threads
from pcpp_runtime.transports.base import Transport, Work

# (layer, numel) of the messages rank 0 sends rank 1 at each displaced step, in forward order:
# 10, 2, 1000 and 6 float32 values (40, 8, 4000 and 24 bytes)
SLICES = [(1, 10), (2, 2), (3, 1000), (5, 6)]
STEPS = [2, 3]  # displaced steps of a 4-step generation


def _exchange(transport, coalesce: int, steps: int = 4):
    """Two ranks run ``steps`` steps of the slices above (step 0 declares, like a generation's
    first call); rank 1 returns what it read at each displaced step and the stale views' addresses."""
    context = StaleContext(transport, ByteLedger(), coalesce, (4, 5))
    peer = 1 - transport.rank
    for layer, numel in SLICES:
        context.declare(layer, 0, peer, send=transport.rank == 0, shapes={s: (numel,) for s in STEPS}, kind="halo",
                        dtype=torch.float32, device=torch.device("cpu"))
    read, addresses = {}, {}
    for step in range(steps):
        displaced = step in STEPS
        context.before_step(step, displaced)
        if displaced and transport.rank == 1:
            read[step] = [context.stale(layer, 0, 0).clone() for layer, _ in SLICES]
            addresses[step] = [context.stale(layer, 0, 0).data_ptr() for layer, _ in SLICES]
        if transport.rank == 0 and step + 1 in STEPS:
            for layer, numel in SLICES:
                context.outgoing(layer, 0, 1).copy_(torch.arange(numel) + 1000.0 * layer + 100_000.0 * step)
                context.after_layer(layer)
        context.after_step(step + 1 in STEPS, STEPS)
    context.drain()
    counters = transport.counters
    return read, addresses, counters.messages_sent + counters.messages_received, context.ledger


def test_slices_arrive_intact_at_fixed_addresses_in_coalesced_messages():
    """64-byte messages: [40 + 8 + 4000] once the third slice is written (the 4000 bytes complete
    the batch), then [24] after the forward -- two transport messages a step carry four slices;
    rank 1 reads at every displaced step exactly what rank 0 wrote the step before, from the
    same addresses at both steps."""
    results = run_in_threads(2, lambda t: _exchange(t, 64), timeout_s=30)
    read, addresses, messages, ledger = results[1]
    for step in STEPS:
        for (layer, numel), got in zip(SLICES, read[step]):
            assert torch.equal(got, torch.arange(numel) + 1000.0 * layer + 100_000.0 * (step - 1)), (step, layer)
    assert addresses[2] == addresses[3]
    assert messages == 2 * len(STEPS)
    assert ledger.total("received") == results[0][3].total("sent") == 4 * sum(n for _, n in SLICES) * len(STEPS)
    # one transport message per slice without coalescing
    assert run_in_threads(2, lambda t: _exchange(t, 0), timeout_s=30)[1][2] == len(SLICES) * len(STEPS)


def test_stale_context_is_declared_once_and_read_only_once_it_exists():
    context = StaleContext(_Nowhere(), ByteLedger(), 0, (4, 5))
    with pytest.raises(RuntimeError, match="read before the first call"):
        context.stale(1, 0, 1)
    context.declare(1, 0, 1, send=False, shapes={1: (4,)}, kind="halo", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="twice"):
        context.declare(1, 0, 1, send=False, shapes={1: (4,)}, kind="halo", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(TypeError, match="of one dtype"):
        context.declare(2, 0, 1, send=False, shapes={1: (4,)}, kind="halo", dtype=torch.float16, device=torch.device("cpu"))
    context.after_step(False, [1])
    with pytest.raises(RuntimeError, match="first call only"):
        context.declare(3, 0, 1, send=False, shapes={1: (4,)}, kind="halo", dtype=torch.float32, device=torch.device("cpu"))


class _Nowhere(Transport):
    """A transport of two ranks that nothing is sent over (declaring needs none)."""

    name = "nowhere"

    def __init__(self) -> None:
        super().__init__(0, 2, 1.0)

    def isend(self, buf, dst, tag) -> Work:
        raise AssertionError("nothing is sent")

    irecv = isend

    def send_object(self, obj, dst) -> None:
        raise AssertionError("nothing is sent")

    def recv_object(self, src, timeout=None):
        raise AssertionError("nothing is received")


def test_coalesce_bytes_is_checked() -> None:
    with pytest.raises(ConfigError, match="coalesce_bytes must be an integer >= 0"):
        ParallelConfig(coalesce_bytes=-1)
    with pytest.raises(ConfigError, match="coalesce_bytes"):
        ParallelConfig(coalesce_bytes=1.5)


@pytest.mark.parametrize("world, policy", [(2, "partial"), (3, "full")])
def test_coalescing_changes_no_number_and_no_byte(tiny_sd, world, policy) -> None:
    """The same generation with one transport message per slice and with messages of at least
    4 KiB: bit-identical latents, the same bytes, fewer transport messages."""
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


class _Recording(Transport):
    """``inner``, recording every call with whether a displaced layer's forward was running."""

    def __init__(self, inner: Transport, inside: threading.local, calls: list) -> None:
        super().__init__(inner.rank, inner.world_size, inner.timeout_s)
        self.inner, self.name, self.counters, self._connected = inner, inner.name, inner.counters, True
        self._inside, self._calls = inside, calls

    def _record(self, what: str) -> None:
        self._calls.append((what, getattr(self._inside, "layer", None)))

    def isend(self, buf, dst, tag) -> Work:
        self._record("isend")
        return _RecordedWork(self.inner.isend(buf, dst, tag), self._record)

    def irecv(self, buf, src, tag) -> Work:
        self._record("irecv")
        return _RecordedWork(self.inner.irecv(buf, src, tag), self._record)

    def all_gather(self, outputs, input) -> None:
        self._record("all_gather")
        self.inner.all_gather(outputs, input)

    def send_object(self, obj, dst) -> None:
        self.inner.send_object(obj, dst)

    def recv_object(self, src, timeout=None):
        return self.inner.recv_object(src, timeout)


class _RecordedWork(Work):
    def __init__(self, work: Work, record) -> None:
        self._work, self._record = work, record

    def wait(self, timeout=None) -> None:
        self._record("wait")
        self._work.wait(timeout)

    def is_completed(self) -> bool:
        return self._work.is_completed()


@pytest.mark.parametrize("world, policy", [(2, "partial"), (3, "full")])
def test_a_displaced_layer_calls_no_transport_and_never_syncs_with_the_host(tiny_sd, world, policy):
    """At displaced steps every displaced layer's forward runs without a transport call (sends,
    receives and waits happen between layers and around the denoiser call), and the denoiser
    call dispatches no ``.item()`` (``aten._local_scalar_dense``); synchronous steps exchange
    fresh context inside the layers, as they must."""
    spec = JobSpec(steps=5, guidance_scale=5.0, seed=3)
    config = ParallelConfig(policy=policy, portion=0.3, warmup_steps=2)
    pipes = [tiny_sd.pipeline() for _ in range(world)]

    def rank(transport):
        inside = threading.local()
        calls: list = []
        parallel = parallelize(pipes[transport.rank], _Recording(transport, inside, calls), config)
        runtime = parallel.runtime
        by_step: dict[int, list] = {}
        items: dict[int, int] = {}
        for module in parallel.pipeline.unet.modules():
            layer = module if hasattr(module, "layer_id") else getattr(module, "processor", None)
            if hasattr(layer, "layer_id"):  # a displaced module, or the module of a displaced attention processor
                module.register_forward_pre_hook(lambda m, a, path=layer.path: setattr(inside, "layer", path))
                module.register_forward_hook(lambda m, a, o: setattr(inside, "layer", None), prepend=True)
        counter = OpCounter()
        unet = parallel.pipeline.unet
        original = unet.forward

        def counted(*args, **kwargs):
            step = runtime.step
            calls.clear()
            counter.reset()
            with counter:
                out = original(*args, **kwargs)
            by_step[step] = list(calls)
            items[step] = counter.by_op["aten._local_scalar_dense"]
            return out

        unet.forward = counted
        try:
            call_pipeline(parallel, spec, 64, 48)
        finally:
            del unet.forward
        return by_step, items, runtime.displaced_steps

    for by_step, items, displaced in run_in_threads(world, rank, timeout_s=120):
        assert displaced == [2, 3, 4]
        for step, calls in by_step.items():
            inside = [what for what, layer in calls if layer is not None]
            if step in displaced:
                assert not inside, (step, inside[:5])
                assert {what for what, _ in calls} <= {"isend", "irecv"}  # posted between layers, waited on outside
                assert items[step] == 0, step
            else:
                assert "all_gather" in inside and "wait" in inside  # a synchronous step's fresh exchange
