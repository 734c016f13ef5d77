"""Helpers for the engine tests: run tiny-sd on N in-process ranks and on one worker."""

from __future__ import annotations

import torch

from pcpp_runtime import ParallelConfig, parallelize
from pcpp_runtime.jobs import JobSpec
from pcpp_runtime.pipelines import call_pipeline, load_pipeline
from pcpp_runtime.threads import run_in_threads


def quiet_pipeline(path: str, scheduler: str | None = None):
    pipe = load_pipeline(path, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_worker(path: str, spec: JobSpec, height: int, width: int) -> torch.Tensor:
    return call_pipeline(quiet_pipeline(path, spec.scheduler), spec, height, width)


def on_ranks(path: str, world: int, config: ParallelConfig, spec: JobSpec, height: int, width: int):
    """Final latents and wrapped pipelines of every rank (pipelines load before threads start:
    diffusers' loading is not thread-safe)."""
    pipes = [quiet_pipeline(path, spec.scheduler) for _ in range(world)]
    wrapped = {}

    def rank(transport):
        wrapped[transport.rank] = parallelize(pipes[transport.rank], transport, config)
        return call_pipeline(wrapped[transport.rank], spec, height, width)

    latents = run_in_threads(world, rank, timeout_s=120)
    return latents, [wrapped[r] for r in range(world)]
