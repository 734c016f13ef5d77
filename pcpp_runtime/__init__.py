"""pcpp-runtime: patch-parallel diffusion inference.

The public API: a configuration, the wrapper, the policies and the registries. Heavy pieces
(transports over processes, models) are imported where they are used.
"""

from .config import ConfigError, ParallelConfig
from .parallel import ParallelDenoiser, ParallelPipeline, parallelize
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

__all__ = [
    "AttentionLayerView",
    "ConditioningPolicy",
    "ConfigError",
    "FullPolicy",
    "NoContextPolicy",
    "ParallelConfig",
    "ParallelDenoiser",
    "ParallelPipeline",
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
