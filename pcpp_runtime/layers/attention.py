"""Self-attention over a strip, attending to other strips' keys and values.

A diffusers attention processor for self-attention layers (``attn1`` of a transformer block, or
a spatial ``Attention`` block). Queries come from this rank's tokens only; keys and values are
this rank's fresh ones plus, per the policy:

* synchronous step: every rank's fresh keys and values (an all-gather), so the result equals one
  device;
* displaced step: the rows the policy asks for (:meth:`ConditioningPolicy.attention_rows`) of
  other ranks' keys and values from the previous step, read from the stale context
  (:mod:`pcpp_runtime.context`). Each rank sends each peer only the rows that peer's request
  names -- for ``partial(p)`` about ``p`` of a neighbour strip, never the whole strip cut after
  receipt.

Keys and values travel together as one ``(B, tokens, 2, inner_dim)`` message. The context is
assembled in global row order, so with all rows present it matches one device token for token.

Numerics follow diffusers' ``AttnProcessor2_0`` (the default processor): one
``scaled_dot_product_attention`` call with its default scale, ignoring ``attn.upcast_attention``
and ``attn.upcast_softmax`` as that processor does (they only steer the explicit score
computation of the legacy ``AttnProcessor``), so SD 2.x models with ``upcast_attention=True``
split exactly as the stock model runs.

Shapes: hidden states ``(B, L, C)`` with ``L = h * w`` tokens of this rank's strip in row-major
order (or ``(B, C, h, w)``); output the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..policies import AttentionLayerView
from ..runtime import Channel, RankRuntime
from .base import DisplacedLayer

__all__ = ["StripSelfAttention"]


class StripSelfAttention(DisplacedLayer):
    """Attention processor; install with ``attention.set_processor(StripSelfAttention(...))``."""

    kind = "self_attention"

    def __init__(self, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        self.width = 0  # tokens per row at this layer's resolution (set on registration)

    # ------------------------------------------------------------------ policy requests
    def _view(self, rank: int, bounds, width: int) -> AttentionLayerView:
        return AttentionLayerView(self.layer_id, self.path, rank, bounds, width, self.runtime.num_steps)

    def _request(self, rank: int, step: int, bounds, width: int) -> dict[int, tuple[int, int]]:
        """The rows ``rank`` attends to at ``step``, checked."""
        policy = self.runtime.policy
        request = policy.attention_rows(self._view(rank, bounds, width), step)
        for peer, (first, end) in request.items():
            rows = bounds[peer][1] - bounds[peer][0] if 0 <= peer < len(bounds) else 0
            if peer == rank or rows == 0 or not (0 <= first < end <= rows):
                raise ValueError(
                    f"policy {policy.describe()} asked rank {rank} to attend rows [{first}, {end}) of peer {peer} "
                    f"at step {step} in {self.path}; peers are other ranks, rows within [0, {rows})"
                )
        return request

    def _register(self, batch: int, inner: int, bounds, width: int, dtype, device) -> None:
        """Declare, for every displaced step, the rows of keys and values this rank receives from
        each peer its policy names, and the rows of its own that each peer asks for; each message
        is ``(B, rows * W, 2, inner)`` (keys and values interleaved), its rows the ``meta``."""
        runtime = self.runtime
        me = runtime.rank
        context = runtime.context
        receives: dict[int, dict[int, tuple[int, int]]] = {}  # peer -> step -> rows of the peer's strip
        sends: dict[int, dict[int, tuple[int, int]]] = {}  # peer -> step -> rows of this rank's strip
        for step in runtime.displaced_steps:
            for peer, rows in self._request(me, step, bounds, width).items():
                receives.setdefault(peer, {})[step] = rows
            for peer in range(runtime.world_size):
                if peer != me:
                    wanted = self._request(peer, step, bounds, width).get(me)
                    if wanted is not None:
                        sends.setdefault(peer, {})[step] = wanted
        for peer, table, send in [(p, t, False) for p, t in sorted(receives.items())] + [(p, t, True) for p, t in sorted(sends.items())]:
            shapes = {step: (batch, (end - first) * width, 2, inner) for step, (first, end) in table.items()}
            context.declare(self.layer_id, Channel.KV, peer, send=send, shapes=shapes, kind="attention_kv",
                            dtype=dtype, device=device, meta=table)
        self.width = width
        self.mark_registered()

    # ------------------------------------------------------------------ context
    def _context(self, key_own: torch.Tensor, value_own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend to, each ``(B, L_context, inner)`` and contiguous, in global
        row order, from this rank's own ``(B, L, inner)``."""
        runtime = self.runtime
        me = runtime.rank
        if self.needs_registration():
            batch, tokens, inner = key_own.shape
            factor = runtime.level_factor_from_tokens(tokens)
            self._register(batch, inner, runtime.plan.level_bounds(factor), runtime.plan.width // factor,
                           key_own.dtype, key_own.device)
        if runtime.synchronous:
            parts = self._gather_fresh(key_own, value_own)
            if runtime.next_step_displaced:
                self._write_outgoing(key_own, value_own)
        else:
            context = runtime.context
            parts = []  # (keys, values) per strip, in row order
            for rank in range(runtime.world_size):
                if rank == me:
                    parts.append((key_own, value_own))
                    continue
                received = context.stale(self.layer_id, Channel.KV, rank)  # (B, rows * W, 2, inner)
                if received is not None:
                    parts.append((received[:, :, 0], received[:, :, 1]))
            self._write_outgoing(key_own, value_own)  # also at the last step: harmless, one graph for every displaced step
        if len(parts) == 1:
            return key_own, value_own
        # one copy each, straight into the (B, L_context, inner) layout of the stock processor's
        # to_k/to_v outputs: attention over the interleaved (.., 2, inner) rows ran 10-13 %
        # slower on the CPU (4096 keys, one thread)
        return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    def _gather_fresh(self, key_own: torch.Tensor, value_own: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A synchronous step: every rank's fresh keys and values (one all-gather)."""
        runtime = self.runtime
        batch, _, inner = key_own.shape
        kv_own = torch.stack([key_own, value_own], dim=2)  # (B, L, 2, inner): one message
        bounds = runtime.plan.level_bounds(runtime.plan.width // self.width)
        gathered = [
            kv_own.new_empty(batch, (end - start) * self.width, 2, inner) if r != runtime.rank else kv_own
            for r, (start, end) in enumerate(bounds)
        ]
        runtime.all_gather(gathered, kv_own, "attention_kv", self.where("gathering keys and values"))
        return [(key_own, value_own) if r == runtime.rank else (g[:, :, 0], g[:, :, 1]) for r, g in enumerate(gathered)]

    def _write_outgoing(self, key_own: torch.Tensor, value_own: torch.Tensor) -> None:
        """The rows of this step's keys and values each peer asks for, into the next step's stale
        context: one stack per peer, straight into its slice."""
        context = self.runtime.context
        width = self.width
        for peer in range(self.runtime.world_size):
            if peer == self.runtime.rank:
                continue
            out = context.outgoing(self.layer_id, Channel.KV, peer)
            if out is not None:
                first, end = context.outgoing_meta(self.layer_id, Channel.KV, peer)
                torch.stack([key_own[:, first * width : end * width], value_own[:, first * width : end * width]], dim=2, out=out)

    # ------------------------------------------------------------------ processor
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise RuntimeError(f"{self.path}: a self-attention layer was called with encoder hidden states")
        if attention_mask is not None:
            raise NotImplementedError(f"{self.path}: attention masks on split self-attention are not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = self._context(attn.to_k(hidden_states), attn.to_v(hidden_states))

        inner = key.shape[-1]
        head_dim = inner // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
