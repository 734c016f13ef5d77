"""Self-attention over a strip, attending to other strips' keys and values.

A diffusers attention processor for self-attention layers (``attn1`` of a transformer block, or
a spatial ``Attention`` block). Queries come from this rank's tokens only; keys and values are
this rank's fresh ones plus, per the policy:

* synchronous step: every rank's fresh keys and values (an all-gather), so the result equals one
  device;
* displaced step: the rows the policy asks for (:meth:`ConditioningPolicy.attention_rows`) of
  other ranks' keys and values from the previous step. Each rank sends each peer only the rows
  that peer's request names -- for ``partial(p)`` about ``p`` of a neighbour strip, never the
  whole strip cut after receipt.

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
from .base import DisplacedLayer, FlatBuffer

__all__ = ["StripSelfAttention"]


class StripSelfAttention(DisplacedLayer):
    """Attention processor; install with ``attention.set_processor(StripSelfAttention(...))``."""

    kind = "self_attention"

    def __init__(self, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        self._recv: dict[int, FlatBuffer] = {}
        self._send: dict[int, FlatBuffer] = {}

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
        runtime = self.runtime
        me = runtime.rank
        recv_rows: dict[int, int] = {}
        send_rows: dict[int, int] = {}
        for step in runtime.displaced_step_list():
            for peer, (first, end) in self._request(me, step, bounds, width).items():
                recv_rows[peer] = max(recv_rows.get(peer, 0), end - first)
            for peer in range(runtime.world_size):
                if peer != me:
                    wanted = self._request(peer, step, bounds, width).get(me)
                    if wanted is not None:
                        send_rows[peer] = max(send_rows.get(peer, 0), wanted[1] - wanted[0])
        per_row = batch * width * 2 * inner
        self._recv = {peer: FlatBuffer(rows * per_row, dtype, device) for peer, rows in recv_rows.items()}
        self._send = {peer: FlatBuffer(rows * per_row, dtype, device) for peer, rows in send_rows.items()}
        self.stale_buffer_bytes = sum(b.nbytes for b in self._recv.values())
        self._pending_recv.clear()
        self._pending_send.clear()
        self.mark_registered()

    # ------------------------------------------------------------------ context
    def _context(self, key_own: torch.Tensor, value_own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend to, each ``(B, L_context, inner)`` and contiguous, in global
        row order, from this rank's own ``(B, L, inner)``."""
        runtime = self.runtime
        me = runtime.rank
        batch, tokens, inner = key_own.shape
        factor = runtime.level_factor_from_tokens(tokens)
        bounds = runtime.plan.level_bounds(factor)
        width = runtime.plan.width // factor
        if self.needs_registration():
            self._register(batch, inner, bounds, width, key_own.dtype, key_own.device)

        # Same posting order on every rank (fresh exchange, next step's sends, next step's
        # receives), for transports that match messages by order alone (NCCL).
        post_next = runtime.next_step_displaced
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, values) per strip, in row order
        if runtime.synchronous:
            kv_own = torch.stack([key_own, value_own], dim=2)  # (B, L, 2, inner): one message
            gathered = [
                kv_own.new_empty(batch, (end - start) * width, 2, inner) if r != me else kv_own
                for r, (start, end) in enumerate(bounds)
            ]
            runtime.all_gather(gathered, kv_own, "attention_kv", self.where("gathering keys and values"))
            parts = [(key_own, value_own) if r == me else (g[:, :, 0], g[:, :, 1]) for r, g in enumerate(gathered)]
            if post_next:
                self._post_sends(key_own, value_own, bounds, width)
        else:
            if post_next:  # this step's keys and values travel while this step computes
                self._post_sends(key_own, value_own, bounds, width)
            self.wait_received()
            request = self._request(me, runtime.step, bounds, width)
            for peer in sorted(set(request) | {me}):
                if peer == me:
                    parts.append((key_own, value_own))
                else:
                    first, end = request[peer]
                    received = self._recv[peer].view((batch, (end - first) * width, 2, inner))
                    parts.append((received[:, :, 0], received[:, :, 1]))
        if len(parts) > 1:
            # one copy each, straight into the (B, L_context, inner) layout of the stock processor's
            # to_k/to_v outputs: attention over the interleaved (.., 2, inner) rows ran 10-13 %
            # slower on the CPU (4096 keys, one thread)
            key = torch.cat([k for k, _ in parts], dim=1)
            value = torch.cat([v for _, v in parts], dim=1)
        else:
            key, value = key_own, value_own
        if post_next:
            self._post_recvs(batch, inner, bounds, width)
        return key, value

    def _post_sends(self, key_own: torch.Tensor, value_own: torch.Tensor, bounds, width: int) -> None:
        runtime = self.runtime
        me = runtime.rank
        step = runtime.step + 1
        where = self.where("sending keys and values")
        self.wait_sent()
        batch, _, inner = key_own.shape
        for peer in range(runtime.world_size):
            if peer == me:
                continue
            wanted = self._request(peer, step, bounds, width).get(me)
            if wanted is None:
                continue
            first, end = wanted
            buf = self._send[peer].view((batch, (end - first) * width, 2, inner))
            buf[:, :, 0].copy_(key_own[:, first * width : end * width])
            buf[:, :, 1].copy_(value_own[:, first * width : end * width])
            self._pending_send.append(runtime.post_stale_send(buf, peer, self.tag(Channel.KV), "attention_kv", where))

    def _post_recvs(self, batch: int, inner: int, bounds, width: int) -> None:
        runtime = self.runtime
        step = runtime.step + 1
        where = self.where("receiving keys and values")
        for peer, (first, end) in sorted(self._request(runtime.rank, step, bounds, width).items()):
            buf = self._recv[peer].view((batch, (end - first) * width, 2, inner))
            self._pending_recv.append(runtime.post_stale_recv(buf, peer, self.tag(Channel.KV), "attention_kv", where))

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
