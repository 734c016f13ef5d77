"""Per-rank engine state: the plan, the step counter, posted messages and byte accounting.

One :class:`RankRuntime` exists per rank and per wrapped denoiser. The displaced layers
(:mod:`pcpp_runtime.layers`) hold a reference to it and ask it three things: which step this
is and whether it is synchronous, the rank's strip at the layer's resolution, and how to post a
message (which also records its bytes). Nothing here is global: two wrapped models in one
process have two runtimes.

Message tags: ``layer_id * 16 + channel``; layer 0's channels tag the messages of stale context
between steps (:mod:`pcpp_runtime.context`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .accounting import ByteLedger
from .config import ParallelConfig
from .partition import PatchPlan, make_partitioner
from .context import StaleContext
from .transports.base import Transport, TransportError, Work

if TYPE_CHECKING:
    from .policies import ConditioningPolicy

__all__ = ["Channel", "RankRuntime"]


class Channel:
    """Tag channels of one layer."""

    HALO_FROM_ABOVE = 0
    HALO_FROM_BELOW = 1
    KV = 2
    NORM = 3
    STALE = 4  # layer 0 only: messages of stale context (halo rows, keys and values)
    STALE_NORM = 5  # layer 0 only: messages of group-norm statistics tables
    SYNC_HALO_FROM_ABOVE = 8
    SYNC_HALO_FROM_BELOW = 9


def make_tag(layer_id: int, channel: int) -> int:
    return layer_id * 16 + channel


class RankRuntime:
    """The engine state of one rank.

    Args:
        transport: this rank's endpoint; ``transport.world_size`` ranks split the latent (with
            CFG parallel, the rank's group).
        config: the job's configuration.
        alignment: strip boundaries are multiples of this many latent rows.
    """

    def __init__(self, transport: Transport, config: ParallelConfig, alignment: int) -> None:
        if config.weights is not None and len(config.weights) != transport.world_size:
            raise ValueError(f"weights has {len(config.weights)} entries for {transport.world_size} strips")
        self.transport = transport
        self.config = config
        self.policy: ConditioningPolicy = config.make_policy()
        self.alignment = alignment
        self.partitioner = make_partitioner(config.partitioner)
        self.rank = transport.rank
        self.world_size = transport.world_size
        self.plan: PatchPlan | None = None
        self.step = 0
        self.num_steps = 0
        #: whether the current step runs with fresh context from every rank, and whether the next
        #: step reads context that this step must write: plain attributes set by :meth:`enter_step`
        #: (a compiled forward sees the same values at every steady displaced step)
        self.synchronous = True
        self.next_step_displaced = False
        self.batch_key: tuple | None = None
        self.full_input: torch.Tensor | None = None
        self.ledger = ByteLedger()
        self.generation = 0
        #: steps of the current generation that read stale context
        self.displaced_steps: list[int] = []
        #: the buffers and messages of stale context between steps
        self.context = StaleContext(
            transport, self.ledger, config.coalesce_bytes, (make_tag(0, Channel.STALE), make_tag(0, Channel.STALE_NORM)),
            eager_posting=not config.compile,  # a compiled forward runs no hooks between layers
        )

    # ------------------------------------------------------------------ planning
    def make_plan(self, height: int, width: int) -> PatchPlan:
        """The strips for a ``height x width`` latent (raises ShapeError before any compute)."""
        return self.partitioner.plan(height, width, self.world_size, self.alignment, self.config.weights)

    def begin(self, num_steps: int, sample_shape: torch.Size) -> None:
        """Start a generation of ``num_steps`` denoiser calls on latents of ``sample_shape``."""
        if num_steps < 1:
            raise ValueError(f"a generation needs at least one denoiser call, got num_steps={num_steps}")
        height, width = int(sample_shape[-2]), int(sample_shape[-1])
        key = (tuple(sample_shape), num_steps)
        self.num_steps = num_steps
        self.step = 0
        if key != self.batch_key:
            self.plan = self.make_plan(height, width)
            self.batch_key = key
            self.generation += 1  # layers re-register their buffers for the new shape
            self.displaced_steps = [s for s in range(num_steps) if not self.is_synchronous(s)]
            self.context.begin_generation()
        self.ledger.clear()

    @property
    def bounds(self) -> tuple[int, int]:
        assert self.plan is not None
        return self.plan.bounds[self.rank]

    def is_synchronous(self, step: int) -> bool:
        return step < self.config.warmup_steps or self.policy.synchronous(step, self.num_steps)

    def enter_step(self) -> None:
        """Set :attr:`synchronous` and :attr:`next_step_displaced` for the current step."""
        nxt = self.step + 1
        self.synchronous = self.is_synchronous(self.step)
        self.next_step_displaced = nxt < self.num_steps and not self.is_synchronous(nxt)

    def level_factor(self, local_rows: int) -> int:
        """How many latent rows one row at a layer's resolution covers, from the strip height
        the layer sees on this rank."""
        latent_rows = self.plan.rows(self.rank)
        factor = latent_rows // local_rows if local_rows else 0
        if factor < 1 or factor * local_rows != latent_rows:
            raise RuntimeError(
                f"rank {self.rank}: a layer saw {local_rows} rows, which does not divide the strip's "
                f"{latent_rows} latent rows; the model's plan or alignment ({self.alignment}) is wrong"
            )
        return factor

    def level_factor_from_tokens(self, tokens: int) -> int:
        """Like :meth:`level_factor`, for a row-major token sequence of this rank's strip."""
        latent_tokens = self.plan.rows(self.rank) * self.plan.width
        factor = math.isqrt(latent_tokens // tokens) if tokens else 0
        if factor < 1 or factor * factor * tokens != latent_tokens:
            raise RuntimeError(
                f"rank {self.rank}: an attention layer saw {tokens} tokens, not a downscaled copy of the "
                f"strip's {self.plan.rows(self.rank)}x{self.plan.width} latent"
            )
        return factor

    # ------------------------------------------------------------------ messages
    def post_send(self, buf: torch.Tensor, dst: int, tag: int, kind: str, step: int) -> Work:
        """Post a send for ``step``'s compute, recording its bytes."""
        self.ledger.add_sent(step, kind, buf.numel() * buf.element_size())
        return self.transport.isend(buf, dst, tag)

    def post_recv(self, buf: torch.Tensor, src: int, tag: int, kind: str, step: int) -> Work:
        """Post a receive for ``step``'s compute, recording its bytes."""
        self.ledger.add_received(step, kind, buf.numel() * buf.element_size())
        return self.transport.irecv(buf, src, tag)

    def all_gather(
        self, outputs: list[torch.Tensor], input: torch.Tensor, kind: str, where: str, transport: Transport | None = None
    ) -> None:
        """Blocking all-gather for the current step over ``transport`` (default: the runtime's),
        recording the bytes received."""
        transport = transport or self.transport
        for peer, out in enumerate(outputs):
            if peer != transport.rank:
                self.ledger.add_received(self.step, kind, out.numel() * out.element_size())
                self.ledger.add_sent(self.step, kind, input.numel() * input.element_size())
        try:
            transport.all_gather(outputs, input)
        except TransportError as exc:
            raise type(exc)(f"{where} (step {self.step}): {exc}") from exc

    def wait(self, work: Work | None, where: str) -> None:
        """Wait on ``work``, adding the layer and step to any transport error."""
        if work is None:
            return
        try:
            work.wait()
        except TransportError as exc:
            raise type(exc)(f"{where} (step {self.step}): {exc}") from exc
