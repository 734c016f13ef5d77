"""Per-rank engine state: the plan, the step counter, posted messages and byte accounting.

One :class:`RankRuntime` exists per rank and per wrapped denoiser. The displaced layers
(:mod:`pcpp_runtime.layers`) hold a reference to it and ask it three things: which step this
is and whether it is synchronous, the rank's strip at the layer's resolution, and how to post a
message (which also records its bytes). Nothing here is global: two wrapped models in one
process have two runtimes.

Message tags: ``layer_id * 16 + channel``; layer 0 is the output gather and the batches of
coalesced stale context (:mod:`pcpp_runtime.staging`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .accounting import ByteLedger
from .config import ParallelConfig
from .partition import PatchPlan, make_partitioner
from .staging import StagedMessages
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
    STAGED = 4  # layer 0 only: a batch of coalesced stale-context messages
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
        self.batch_key: tuple | None = None
        self.full_input: torch.Tensor | None = None
        self.ledger = ByteLedger()
        self.generation = 0
        #: the next step's context goes through here when ``config.coalesce_bytes`` > 0
        self.staged: StagedMessages | None = None
        if config.coalesce_bytes > 0 and transport.world_size > 1:
            self.staged = StagedMessages(transport, config.coalesce_bytes, make_tag(0, Channel.STAGED))

    # ------------------------------------------------------------------ planning
    def make_plan(self, height: int, width: int) -> PatchPlan:
        """The strips for a ``height x width`` latent (raises ShapeError before any compute)."""
        return self.partitioner.plan(height, width, self.world_size, self.alignment, self.config.weights)

    def begin(self, num_steps: int, sample_shape: torch.Size) -> None:
        """Start a generation of ``num_steps`` denoiser calls on latents of ``sample_shape``."""
        if num_steps < 1:
            raise ValueError(f"a generation needs at least one denoiser call, got num_steps={num_steps}")
        height, width = int(sample_shape[-2]), int(sample_shape[-1])
        plan = self.make_plan(height, width)
        key = (tuple(sample_shape), num_steps)
        if key != self.batch_key:
            self.batch_key = key
            self.generation += 1  # layers re-register their buffers for the new shape
        self.plan = plan
        self.num_steps = num_steps
        self.step = 0
        self.ledger.clear()

    @property
    def bounds(self) -> tuple[int, int]:
        assert self.plan is not None
        return self.plan.bounds[self.rank]

    def is_synchronous(self, step: int) -> bool:
        return step < self.config.warmup_steps or self.policy.synchronous(step, self.num_steps)

    @property
    def synchronous(self) -> bool:
        """Whether the current step runs with fresh context from every rank."""
        return self.is_synchronous(self.step)

    @property
    def next_step_displaced(self) -> bool:
        """Whether the next step reads context that this step must send now."""
        nxt = self.step + 1
        return nxt < self.num_steps and not self.is_synchronous(nxt)

    def displaced_step_list(self) -> list[int]:
        """Steps of this generation that read stale context (used to size buffers once)."""
        return [s for s in range(self.num_steps) if not self.is_synchronous(s)]

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

    def post_stale_send(self, buf: torch.Tensor, dst: int, tag: int, kind: str, where: str) -> Work:
        """Post a send of context for the *next* step, recording its bytes. Coalesced with the
        step's other such messages to ``dst`` when ``config.coalesce_bytes`` > 0 (``buf`` must
        then stay unchanged until the step ends; the returned handle completes when it ends)."""
        step = self.step + 1
        self.ledger.add_sent(step, kind, buf.numel() * buf.element_size())
        if self.staged is None:
            return self.transport.isend(buf, dst, tag)
        return self.staged.send(buf, dst, where)

    def post_stale_recv(self, buf: torch.Tensor, src: int, tag: int, kind: str, where: str) -> Work:
        """Post a receive of the next step's context, recording its bytes (coalesced like
        :meth:`post_stale_send`; every rank posts these in the same order as its peers send)."""
        step = self.step + 1
        self.ledger.add_received(step, kind, buf.numel() * buf.element_size())
        if self.staged is None:
            return self.transport.irecv(buf, src, tag)
        return self.staged.recv(buf, src, where)

    def end_step_messages(self) -> None:
        """The step's compute is done: send what is still queued for the next step."""
        if self.staged is not None:
            self.staged.flush()

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
