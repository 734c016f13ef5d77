"""The denoiser wrapper: only the denoiser call is parallel.

Every rank holds the full latent and runs the sampler's step itself (same seed everywhere). A
:class:`ParallelDenoiser` hooks the denoiser module: on the way in it records the full latent
and passes on this rank's strip of rows; on the way out it all-gathers the strips, so the
caller gets the full ``(B, C, H, W)`` prediction, as from the unwrapped model. Any diffusers
pipeline and any scheduler therefore work unchanged.

    transport = ...                       # this rank's endpoint
    pipe = parallelize(pipe, transport, ParallelConfig(policy="partial", portion=0.3))
    image = pipe("a red circle", num_inference_steps=20).images[0]   # called exactly as before

With one rank nothing is attached: the call is the unwrapped pipeline's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .apply import AppliedPlan, apply_plan
from .config import ParallelConfig, check_cuda_graphs
from .models.plans import ModelPlan, plan_for
from .runtime import RankRuntime
from .transports.base import Transport
from .transports.group import GroupTransport

__all__ = ["ParallelDenoiser", "ParallelPipeline", "parallelize"]


class ParallelDenoiser:
    """A denoiser split over the ranks of ``transport``.

    Args:
        model: a diffusers denoiser (``UNet2DConditionModel``, ``DiTTransformer2DModel``,
            ``PixArtTransformer2DModel``: see :func:`pcpp_runtime.models.plan_for`).
        transport: this rank's connected transport.
        config: the job's configuration.
        num_steps: denoiser calls per generation; or ``steps_source``, a callable that tells
            it at the first call of each generation (a pipeline's ``len(scheduler.timesteps)``).
        plan: the model plan; by default the one for the model's family.

    Calling it is calling the model: same arguments, same output type.
    """

    def __init__(
        self,
        model: nn.Module,
        transport: Transport,
        config: ParallelConfig | None = None,
        *,
        num_steps: int | None = None,
        steps_source: Callable[[], int] | None = None,
        plan: ModelPlan | None = None,
    ) -> None:
        self.model = model
        self.transport = transport
        self.config = config or ParallelConfig()
        self.config.check_world_size(transport.world_size)
        check_cuda_graphs(self.config.cuda_graphs, torch.cuda.is_available())
        self.plan = plan or plan_for(model)
        # CFG parallel: ranks [0, N/2) take the first half of the batch (unconditional), the rest
        # the second; each half is split into strips inside its group.
        self.cfg_group: int | None = None
        strips = transport
        if self.config.cfg_split:
            half = transport.world_size // 2
            self.cfg_group = transport.rank // half
            strips = GroupTransport(transport, range(self.cfg_group * half, (self.cfg_group + 1) * half))
        self.runtime = RankRuntime(strips, self.config, self.plan.alignment)
        self._full_shape: tuple[int, ...] | None = None
        self._num_steps = num_steps
        self._steps_source = steps_source
        self._in_generation = False
        self._broken: str | None = None
        self._applied: AppliedPlan | None = None
        self._plan_forward: Any = None  # the plan's instance forward under the compiled one
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._out_buffers: list[torch.Tensor] = []
        if transport.world_size > 1:
            self.attach()

    # ------------------------------------------------------------------ attach / remove
    def attach(self) -> None:
        if self._hooks:
            return
        if self.runtime.world_size > 1:
            self._applied = apply_plan(self.model, self.plan, self.runtime)
            if self.config.compile:
                self._compile_displaced_forward()
        self._hooks = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Take every hook and displaced layer off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if "forward" in vars(self.model) and getattr(self.model.forward, "pcpp_compiled", False):
            del self.model.forward  # the compiled path; the plan's own forward (if any) is undone next
            if self._plan_forward is not None:
                self.model.forward = self._plan_forward
        if self._applied is not None:
            self._applied.remove()
            self._applied = None

    def _compile_displaced_forward(self) -> None:
        """Route the model's calls at displaced steps through ``torch.compile(forward,
        fullgraph=True)``: an instance attribute ``forward`` that picks the compiled or the eager
        forward per step (synchronous steps exchange fresh context from inside the layers, so they
        stay eager). The choice itself runs outside the compiled region."""
        eager = self.model.forward  # the plan's strip-aware forward where it installs one
        self._plan_forward = vars(self.model).get("forward")
        backend = "inductor" if self.config.compile is True else self.config.compile
        compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend=backend)
        runtime = self.runtime

        def forward(*args: Any, **kwargs: Any) -> Any:
            return eager(*args, **kwargs) if runtime.synchronous else compiled(*args, **kwargs)

        forward.pcpp_compiled = True  # type: ignore[attr-defined]
        self.model.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ generations
    def reset(self) -> None:
        """Forget a generation that did not finish (its messages are drained)."""
        if self._in_generation:
            self.finish()

    def finish(self) -> None:
        """End the current generation: every posted message completes."""
        self.runtime.context.drain()
        self._in_generation = False
        self.runtime.step = 0

    def abandon(self, reason: str = "a generation failed") -> None:
        """Forget a generation that failed, without waiting on peers that may be gone.

        Messages of that generation may still be in flight and would be taken for the next
        one's, so this denoiser refuses further calls: reconnect the transport and wrap again.
        """
        self.runtime.context.abandon()
        self._in_generation = False
        self.runtime.step = 0
        self._broken = reason

    def stale_buffer_bytes(self) -> dict[str, int]:
        """Bytes of this rank's buffers of other ranks' stale context, by kind."""
        return self.runtime.context.stale_buffer_bytes()

    def _generation_steps(self) -> int:
        if self._num_steps is not None:
            return self._num_steps
        if self._steps_source is not None:
            return int(self._steps_source())
        raise RuntimeError(
            "ParallelDenoiser does not know how many denoiser calls a generation has: "
            "pass num_steps= (bare denoiser) or wrap the pipeline with parallelize()"
        )

    # ------------------------------------------------------------------ hooks
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._broken is not None:
            raise RuntimeError(
                f"rank {self.transport.rank}: {self._broken}, and its messages may still be in flight; "
                "connect a new transport and wrap the model again"
            )
        for name in ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"{name} (ControlNet/adapters) is not supported by patch parallelism yet")
        # the latent: first positional argument, or the keyword a UNet (`sample`) or a
        # transformer (`hidden_states`: DiT, PixArt) names it by
        key = None if args else ("sample" if "sample" in kwargs else "hidden_states")
        if key is not None and key not in kwargs:
            raise TypeError(
                f"{type(module).__name__} was called without a latent (no positional, `sample` or `hidden_states` argument)"
            )
        sample = args[0] if args else kwargs[key]
        runtime = self.runtime
        if not self._in_generation:
            self._full_shape = tuple(sample.shape)
        elif tuple(sample.shape) != self._full_shape:
            raise RuntimeError(f"latent shape changed from {self._full_shape} to {tuple(sample.shape)} inside a generation")
        if self.cfg_group is not None:
            args, kwargs = self._take_batch_half(args, kwargs, sample.shape[0])
            sample = args[0] if args else kwargs[key]
        if not self._in_generation:
            runtime.begin(self._generation_steps(), sample.shape)
            self._in_generation = True
            self._register_outputs(sample)
        runtime.full_input = sample
        runtime.enter_step()
        runtime.context.before_step(runtime.step, displaced=not runtime.synchronous)  # waits happen here, not in the layers
        start, end = runtime.bounds
        strip = sample[:, :, start:end]
        if args:
            args = (strip,) + tuple(args[1:])
        else:
            kwargs = dict(kwargs, **{key: strip})
        return args, kwargs

    def _take_batch_half(self, args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
        """CFG parallel: keep this group's half of every per-sample tensor (first dimension equal
        to the latent's batch; nested in dicts such as SDXL's ``added_cond_kwargs``)."""
        if batch % 2:
            raise ValueError(
                f"CFG parallel needs classifier-free guidance (a batch of unconditional + conditional "
                f"latents), but the denoiser got a batch of {batch}; use a guidance scale > 1 or drop --cfg-parallel"
            )
        half = batch // 2
        part = slice(self.cfg_group * half, (self.cfg_group + 1) * half)

        def take(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                return value[part]
            if isinstance(value, dict):
                return {k: take(v) for k, v in value.items()}
            return value

        return tuple(take(a) for a in args), {k: take(v) for k, v in kwargs.items()}

    def _register_outputs(self, sample: torch.Tensor) -> None:
        """One receive buffer per rank of the whole job: its strip of its group's batch half."""
        plan = self.runtime.plan
        batch, _, _, width = sample.shape
        channels = self.plan.output_channels
        self._out_buffers = [
            sample.new_empty(batch, channels, plan.rows(r % plan.world_size), width)
            for r in range(self.transport.world_size)
        ]

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        runtime = self.runtime
        # the next step's context leaves (and its receives are posted) before this rank waits below
        runtime.context.after_step(runtime.next_step_displaced, runtime.displaced_steps)
        strip = output[0] if isinstance(output, tuple) else output.sample
        if strip.dtype != self._out_buffers[0].dtype:
            self._out_buffers = [b.to(strip.dtype) for b in self._out_buffers]
        runtime.all_gather(
            self._out_buffers, strip.contiguous(), "output", "gathering the denoiser output", transport=self.transport
        )
        strips = runtime.world_size
        halves = [torch.cat(self._out_buffers[g : g + strips], dim=2) for g in range(0, len(self._out_buffers), strips)]
        full = torch.cat(halves, dim=0) if len(halves) > 1 else halves[0]
        runtime.full_input = None
        runtime.step += 1
        if runtime.step >= runtime.num_steps:
            self.finish()
        if isinstance(output, tuple):
            return (full,) + tuple(output[1:])
        output.sample = full
        return output


class ParallelPipeline:
    """A diffusers pipeline whose denoiser is split over the ranks; call it as the pipeline.

    Attributes:
        pipeline: the wrapped pipeline (its ``unet`` carries the hooks).
        denoiser: the :class:`ParallelDenoiser`.
    """

    def __init__(self, pipeline: Any, transport: Transport, config: ParallelConfig | None = None) -> None:
        self.pipeline = pipeline
        denoiser = getattr(pipeline, "unet", None)
        if denoiser is None:
            denoiser = getattr(pipeline, "transformer", None)
        if denoiser is None:
            raise TypeError(f"{type(pipeline).__name__} has neither a unet nor a transformer to split")
        self.denoiser = ParallelDenoiser(
            denoiser, transport, config, steps_source=lambda: len(pipeline.scheduler.timesteps)
        )

    @property
    def runtime(self) -> RankRuntime:
        return self.denoiser.runtime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.denoiser.reset()
        try:
            return self.pipeline(*args, **kwargs)
        except BaseException as exc:
            self.denoiser.abandon(f"a generation failed ({type(exc).__name__}: {exc})")
            raise


def parallelize(obj: Any, transport: Transport, config: ParallelConfig | None = None, **denoiser_kwargs: Any):
    """Split a diffusers pipeline (returns :class:`ParallelPipeline`) or a bare denoiser
    (returns :class:`ParallelDenoiser`; give ``num_steps``) over ``transport``'s ranks."""
    if isinstance(obj, nn.Module):
        return ParallelDenoiser(obj, transport, config, **denoiser_kwargs)
    return ParallelPipeline(obj, transport, config)
