"""The run configuration: one frozen dataclass, checked in one place."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

__all__ = ["CUDA_GRAPH_MODES", "ConfigError", "ParallelConfig", "check_cuda_graphs"]

#: values of ``ParallelConfig.cuda_graphs`` (``--cuda-graphs``)
CUDA_GRAPH_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A configuration value is out of range; the message names it and what would work."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one job splits and conditions the denoiser.

    Attributes:
        policy: conditioning policy name (``sync``, ``full``, ``partial``, ``none`` or a plugin).
        portion: for ``partial`` (and plugins that read it), the fraction p in (0, 1] of each
            neighbour strip's rows, nearest the boundary, that a rank attends to.
        warmup_steps: the first denoising steps that run synchronously with fresh context.
            Policies that use stale context need at least one (it fills their buffers).
        partitioner: how latent rows are split over ranks (``rows`` or a plugin).
        weights: relative capacity per rank for weighted partitioners; ``None`` for equal.
        cfg_split: send the two halves of a classifier-free-guidance batch to two rank groups.
        timeout_s: the timeout of every blocking wait on a peer, in seconds.
        coalesce_bytes: the next step's context to one peer is sent in batches of at least this
            many bytes (and what is left when the step ends) instead of one transport message per
            layer (:mod:`pcpp_runtime.context`); 0 sends every layer's message on its own.
        compile: run the strip forward of displaced steps through ``torch.compile(fullgraph=True)``
            (synchronous steps stay eager; messages are then sent after the forward, not between
            layers): ``True`` with torch's default backend (inductor), or a backend's name
            (``"aot_eager"`` traces and runs the same graph without generating kernels).
        cuda_graphs: ``on``, ``off`` or ``auto``: replay each phase of a step from a CUDA graph.
            Not available yet: ``on`` is refused (on a machine without CUDA as a usage error
            before any compute), ``auto`` and ``off`` run eager.
    """

    policy: str = "partial"
    portion: float = 0.3
    warmup_steps: int = 4
    partitioner: str = "rows"
    weights: tuple[float, ...] | None = None
    cfg_split: bool = False
    timeout_s: float = 300.0
    coalesce_bytes: int = 256 * 1024
    compile: bool | str = False
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        from . import registry  # late: the registry imports the built-in plugins

        if self.policy not in registry.policies:
            raise ConfigError(f"unknown policy {self.policy!r}; choose one of: {', '.join(registry.policies.names())}")
        if isinstance(self.portion, bool) or not isinstance(self.portion, (int, float)) or not (
            0.0 < float(self.portion) <= 1.0
        ) or math.isnan(float(self.portion)):
            raise ConfigError(f"portion must be a number in (0, 1], got {self.portion!r} (the PCPP default is 0.3)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.partitioner not in registry.partitioners:
            raise ConfigError(
                f"unknown partitioner {self.partitioner!r}; choose one of: {', '.join(registry.partitioners.names())}"
            )
        if self.weights is not None:
            weights = tuple(self.weights)
            if not weights or any(not isinstance(w, (int, float)) or not (w > 0) or math.isinf(w) for w in weights):
                raise ConfigError(f"weights must be positive finite numbers, one per rank, got {self.weights!r}")
            object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        if not isinstance(self.timeout_s, (int, float)) or not (self.timeout_s > 0) or math.isinf(self.timeout_s):
            raise ConfigError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        if isinstance(self.coalesce_bytes, bool) or not isinstance(self.coalesce_bytes, int) or self.coalesce_bytes < 0:
            raise ConfigError(
                f"coalesce_bytes must be an integer >= 0 (0: one message per layer), got {self.coalesce_bytes!r}"
            )
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ConfigError(f"compile must be True, False or a torch.compile backend's name, got {self.compile!r}")
        if self.cuda_graphs not in CUDA_GRAPH_MODES:
            raise ConfigError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_MODES)}, got {self.cuda_graphs!r}")
        policy = registry.policies.get(self.policy)(self)
        if policy.uses_stale_context and self.warmup_steps < 1:
            raise ConfigError(
                f"policy {self.policy!r} conditions on the previous step's context, so it needs at least one "
                f"synchronous warm-up step to fill its buffers; got warmup_steps={self.warmup_steps} (use >= 1)"
            )
        object.__setattr__(self, "portion", float(self.portion))

    def make_policy(self):
        """A fresh policy object for this configuration."""
        from . import registry

        return registry.policies.get(self.policy)(self)

    def check_world_size(self, world_size: int) -> None:
        """Raise :class:`ConfigError` if this configuration cannot run on ``world_size`` ranks."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be an integer >= 1, got {world_size!r}")
        if self.cfg_split and (world_size < 2 or world_size % 2):
            raise ConfigError(
                f"CFG parallel sends the two halves of the guidance batch to two equal groups of ranks, so the "
                f"world size must be even; got {world_size} (use {max(2, world_size - 1)} or {world_size + 1} ranks, "
                f"or drop --cfg-parallel)"
            )
        strips = world_size // 2 if self.cfg_split else world_size
        if self.weights is not None and len(self.weights) != strips:
            raise ConfigError(
                f"weights has {len(self.weights)} entries but there are {strips} strips"
                + (" (one per rank of a CFG group)" if self.cfg_split else f" (world size {world_size})")
            )

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["weights"] = list(self.weights) if self.weights is not None else None
        return data

    def fingerprint(self) -> str:
        """A short hash of the configuration, for handshakes between ranks of one job."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def check_cuda_graphs(mode: str, cuda_available: bool) -> None:
    """Refuse ``cuda_graphs="on"``, before any compute: replaying steps from CUDA graphs is not
    available in this version, and without CUDA there is nothing to capture. ``auto`` means eager."""
    if mode != "on":
        return
    if not cuda_available:
        raise ConfigError(
            "--cuda-graphs on needs CUDA, and this machine has no CUDA device: use --cuda-graphs auto or off (eager)"
        )
    raise ConfigError(
        "--cuda-graphs on: capturing steps in CUDA graphs is not available in this version; use --cuda-graphs auto "
        "(eager) or --compile"
    )
