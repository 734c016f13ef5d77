"""Fixtures shared by the test files.

* ``model_cache`` (every session): built-in models are built once per session into a temporary
  cache, which subprocesses see too; ``builtin_model``, ``tiny_sd`` and ``tiny_sd_path`` give a
  model and how the engine tests run it (``engine_helpers.py`` with the path filled in).
* ``plugin_registries``: the plugin registries, put back as they were after the test.
* ``mpiexec`` and ``torchrun``: launchers that ``pip install -e '.[test]'`` installs; a test that
  needs one fails, saying what to install, where it is missing.
* ``no_leftovers`` and ``one_worker_png``: for jobs of ``pcpp generate`` in real processes
  (``launch_jobs.py``).

Plain modules beside this file hold what scripts import too or what module-level helpers call:
``engine_helpers.py`` (imported by the worker scripts and a benchmark), ``launch_jobs.py``,
``netns_fixture.py``, ``slurm_fixture.py`` and ``transports/transport_jobs.py``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> str:
    """Build built-in models into a per-session cache (also seen by subprocesses)."""
    cache = os.environ.get("PCPP_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("models"))
    os.environ["PCPP_MODEL_CACHE"] = cache
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    return cache


# ---------------------------------------------------------------------------- models
@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A built-in model in the session's cache, and jobs on it: ``load`` arguments are those of
    ``engine_helpers.quiet_pipeline`` (``pipeline_class``, ``device``); the scheduler is the
    spec's."""

    name: str
    path: str

    def pipeline(self, scheduler: str | None = None, **load):
        from engine_helpers import quiet_pipeline

        return quiet_pipeline(self.path, scheduler, **load)

    def one_worker(self, spec, height: int, width: int, **load):
        """One worker's final latent."""
        from engine_helpers import one_worker

        return one_worker(self.path, spec, height, width, **load)

    def on_ranks(self, world: int, config, spec, height: int, width: int, **load):
        """Every rank's final latent and wrapped pipeline, ranks as threads of this process."""
        from engine_helpers import on_ranks

        return on_ranks(self.path, world, config, spec, height, width, **load)


@pytest.fixture(scope="session")
def builtin_model(model_cache) -> Callable[[str], BuiltinModel]:
    """``builtin_model(name)``: the built-in model ``name``, built on first use."""
    from pcpp_runtime.models.builtin import builtin_model_path

    def get(name: str) -> BuiltinModel:
        return BuiltinModel(name, str(builtin_model_path(name)))

    return get


@pytest.fixture(scope="session")
def tiny_sd(builtin_model) -> BuiltinModel:
    return builtin_model("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_path(tiny_sd) -> str:
    return tiny_sd.path


# ---------------------------------------------------------------------------- plugins
@pytest.fixture
def plugin_registries():
    """``pcpp_runtime.registry``, whose registries (policies, partitioners, transports) hold
    after the test exactly what they held before it, whatever it registered.

    The registries have no unregister (a plugin stays for the process), so their entries are
    copied and put back. The built-ins and entry points load first: put back after a test that
    was first to look something up, they would otherwise not load again."""
    from pcpp_runtime import registry

    saved = []
    for plugins in (registry.policies, registry.partitioners, registry.transports):
        plugins.names()
        saved.append((plugins, dict(plugins._factories)))
    try:
        yield registry
    finally:
        for plugins, factories in saved:
            plugins._factories.clear()
            plugins._factories.update(factories)


# ---------------------------------------------------------------------------- launchers
@pytest.fixture(scope="session")
def mpiexec() -> str:
    """MPICH's ``mpiexec`` (the ``mpich`` wheel's, next to this Python, else one on PATH)."""
    from transport_jobs import mpiexec_path, skip_without_mpiexec

    skip_without_mpiexec("mpi")
    return mpiexec_path()


@pytest.fixture(scope="session")
def torchrun() -> Path:
    """torch's ``torchrun``, next to this Python."""
    path = Path(sys.executable).parent / "torchrun"
    if not path.exists():
        pytest.fail(f"no torchrun at {path}: it comes with torch (pip install -e '.[test]')", pytrace=False)
    return path


# ---------------------------------------------------------------------------- processes
@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """After the test: nothing this test process started is still running."""
    from launch_jobs import descendants, kill_pids

    yield
    deadline = time.monotonic() + 5
    while descendants(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = descendants(os.getpid())
    kill_pids(left)
    assert not left, f"processes left running after the test: {left}"


@pytest.fixture
def one_worker_png() -> Path:
    """The PNG of one worker for ``launch_jobs.JOB_ARGS``, made once per session.

    Function scope on purpose: module-scoped fixtures that skip a module (``ns_pair``,
    ``slurm_cluster``) are set up first, so nothing is made where the module is skipped."""
    from launch_jobs import one_worker_reference

    return one_worker_reference()
