"""Run a built-in model on N in-process ranks and on one worker.

A plain module rather than fixtures because scripts import it too: the worker script
``e2e_worker.py`` (started as a subprocess by ``test_process_e2e.py``), ``gpu_worker.py`` and
``benchmarks/policy_table.py``. Tests reach these through conftest's ``tiny_sd`` and
``builtin_model`` fixtures.
"""

from __future__ import annotations

import torch

from pcpp_runtime import ParallelConfig, parallelize
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.pipelines import call_pipeline, load_pipeline
from pcpp_runtime.threads import run_in_threads


def quiet_pipeline(path: str, scheduler: str | None = None, pipeline_class=None, device: str = "cpu"):
    """The pipeline at ``path`` without progress bars (optionally re-wrapped in another pipeline
    class over the same components)."""
    pipe = load_pipeline(path, scheduler, device=device)
    if pipeline_class is not None:
        pipe = pipeline_class(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_worker(path: str, spec: JobSpec, height: int, width: int, **load) -> torch.Tensor:
    """One worker's final latent (``load``: more arguments of :func:`quiet_pipeline`)."""
    return call_pipeline(quiet_pipeline(path, spec.scheduler, **load), spec, height, width)


def on_ranks(path: str, world: int, config: ParallelConfig, spec: JobSpec, height: int, width: int, **load):
    """Final latents and wrapped pipelines of every rank, one thread per rank (``load``: more
    arguments of :func:`quiet_pipeline`; the pipelines load before the threads start:
    diffusers' loading is not thread-safe)."""
    pipes = [quiet_pipeline(path, spec.scheduler, **load) for _ in range(world)]
    wrapped = {}

    def rank(transport):
        wrapped[transport.rank] = parallelize(pipes[transport.rank], transport, config)
        return call_pipeline(wrapped[transport.rank], spec, height, width)

    latents = run_in_threads(world, rank, timeout_s=120)
    return latents, [wrapped[r] for r in range(world)]
