"""Count the aten operators one rank dispatches per denoiser call (``benchmarks/host_ops.py``).

:class:`OpCounter` is a ``TorchDispatchMode``: entered on one thread, it counts the operators
that thread dispatches, view operators (which launch nothing) apart from the rest.
:class:`UncountedTransport` hides a transport's own operators from it, so the count is the
engine's. :func:`count_job_ops` runs the benchmark model on N thread ranks and counts rank 0.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ..transports.base import Transport, Work

__all__ = ["OpCounter", "UncountedTransport", "count_job_ops", "count_stock_ops"]


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten operators: ``counts["view"]`` and ``counts["non_view"]``, and
    ``by_op`` per operator name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.by_op: collections.Counter = collections.Counter()

    def reset(self) -> None:
        self.counts.clear()
        self.by_op.clear()

    def snapshot(self) -> dict[str, int]:
        return {"non_view": self.counts["non_view"], "view": self.counts["view"]}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["view" if func.is_view else "non_view"] += 1
        self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class _UncountedWork(Work):
    def __init__(self, work: Work) -> None:
        self._work = work

    def wait(self, timeout: float | None = None) -> None:
        with _disable_current_modes():
            self._work.wait(timeout)

    def is_completed(self) -> bool:
        with _disable_current_modes():
            return self._work.is_completed()


class UncountedTransport(Transport):
    """``inner`` with every call run outside any dispatch mode: its copies are not counted."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner.rank, inner.world_size, inner.timeout_s)
        self.inner = inner
        self.name = inner.name
        self.counters = inner.counters
        self._connected = True

    def isend(self, buf: torch.Tensor, dst: int, tag: int) -> Work:
        with _disable_current_modes():
            return _UncountedWork(self.inner.isend(buf, dst, tag))

    def irecv(self, buf: torch.Tensor, src: int, tag: int) -> Work:
        with _disable_current_modes():
            return _UncountedWork(self.inner.irecv(buf, src, tag))

    def all_gather(self, outputs, input) -> None:
        with _disable_current_modes():
            self.inner.all_gather(outputs, input)

    def all_reduce(self, tensor, op: str = "sum") -> None:
        with _disable_current_modes():
            self.inner.all_reduce(tensor, op)

    def barrier(self) -> None:
        with _disable_current_modes():
            self.inner.barrier()

    def send_object(self, obj: Any, dst: int) -> None:
        self.inner.send_object(obj, dst)

    def recv_object(self, src: int, timeout: float | None = None) -> Any:
        return self.inner.recv_object(src, timeout)


def count_stock_ops(model: str, latent: int, rows: int) -> dict[str, int]:
    """Operators of the unwrapped UNet called once on the first ``rows`` latent rows."""
    from .model import build_unet, make_inputs

    unet = build_unet(model)
    inputs = make_inputs(model, latent)
    strip = inputs.latents[:, :, :rows].contiguous()
    timestep = torch.tensor(500)
    counter = OpCounter()
    with torch.no_grad():
        for counting in (False, True):  # the first call may initialise lazily
            with counter if counting else contextlib.nullcontext():
                unet(strip, timestep, encoder_hidden_states=inputs.encoder_hidden_states,
                     added_cond_kwargs=inputs.added_cond_kwargs, return_dict=False)
    return counter.snapshot()


def _count_engine_steps(model: str, latent: int, world: int, config, steps: int) -> list[dict[str, int]]:
    """Rank 0's operators for each of ``steps`` denoiser calls of a generation."""
    from pcpp_runtime import parallelize
    from pcpp_runtime.threads import run_in_threads

    from .model import build_unet, denoise, make_inputs, make_scheduler

    unets = [build_unet(model) for _ in range(world)]
    inputs = make_inputs(model, latent)

    def rank(transport):
        wrapped = parallelize(unets[transport.rank], UncountedTransport(transport), config, num_steps=steps)
        counter = OpCounter()
        per_call: list[dict[str, int]] = []

        def counted(*args, **kwargs):
            if transport.rank != 0:
                return wrapped(*args, **kwargs)
            counter.reset()
            with counter:
                out = wrapped(*args, **kwargs)
            per_call.append(counter.snapshot())
            return out

        denoise(counted, make_scheduler(steps), inputs)
        return per_call

    return run_in_threads(world, rank, 300)[0]


def count_job_ops(model: str, latent: int, world: int, policy: str, portion: float = 0.3) -> dict[str, Any]:
    """Rank 0's operators per call: the stock UNet on its strip, a synchronous step (``sync``
    policy, second call) and a steady displaced step of ``policy`` (second displaced call)."""
    from pcpp_runtime import ParallelConfig
    from pcpp_runtime.partition import make_partitioner

    warmup = 2
    rows = make_partitioner("rows").plan(latent, latent, world, 4).rows(0)
    sync = _count_engine_steps(model, latent, world, ParallelConfig(policy="sync", timeout_s=60), 2)[1]
    config = ParallelConfig(policy=policy, portion=portion, warmup_steps=warmup, timeout_s=60)
    displaced = _count_engine_steps(model, latent, world, config, warmup + 2)[warmup + 1]
    label = f"{policy}({portion:g})" if policy == "partial" else policy
    return {"model": model, "latent": latent, "world_size": world, "label": label, "stock": count_stock_ops(model, latent, rows),
            "sync": sync, "displaced": displaced}
