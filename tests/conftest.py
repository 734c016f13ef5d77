"""Shared fixtures: the tiny-sd model built once per session into a temporary cache."""

from __future__ import annotations

import os
import warnings

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Build built-in models into a per-session cache (also seen by subprocesses)."""
    cache = os.environ.get("PCPP_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("models"))
    os.environ["PCPP_MODEL_CACHE"] = cache
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    return cache


@pytest.fixture(scope="session")
def tiny_sd_path(model_cache) -> str:
    from pcpp_runtime.models.builtin import builtin_model_path

    return str(builtin_model_path("tiny-sd"))
