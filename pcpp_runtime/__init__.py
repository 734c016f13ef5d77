"""pcpp-runtime: patch-parallel diffusion inference.

The public API: a configuration, the wrapper, the policies and the registries. Importing the
package does not import torch (so ``pcpp --help`` is quick): :func:`parallelize` imports the
engine when called, and the wrapper classes live in :mod:`pcpp_runtime.parallel`.
"""

from typing import Any

from .config import ConfigError, ParallelConfig
from .partition import PatchPlan, ShapeError
from .policies import (
    AttentionLayerView,
    ConditioningPolicy,
    FullPolicy,
    NoContextPolicy,
    PartialPolicy,
    SyncPolicy,
    portion_rows,
    register_policy,
)
from .registry import partitioners, policies, transports

__version__ = "0.1.0"


def parallelize(obj: Any, transport: Any, config: ParallelConfig | None = None, **denoiser_kwargs: Any) -> Any:
    """Split a diffusers pipeline or a bare denoiser over ``transport``'s ranks; see
    :func:`pcpp_runtime.parallel.parallelize`."""
    from .parallel import parallelize as attach

    return attach(obj, transport, config, **denoiser_kwargs)


__all__ = [
    "AttentionLayerView",
    "ConditioningPolicy",
    "ConfigError",
    "FullPolicy",
    "NoContextPolicy",
    "ParallelConfig",
    "PartialPolicy",
    "PatchPlan",
    "ShapeError",
    "SyncPolicy",
    "parallelize",
    "partitioners",
    "policies",
    "portion_rows",
    "register_policy",
    "transports",
]
