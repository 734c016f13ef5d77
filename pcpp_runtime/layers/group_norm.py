"""Group normalization over a strip, with whole-image statistics.

Each rank computes its strip's per-(sample, group) mean and biased variance in float32 --
``stats``, shape ``(B, G, 2)`` -- and combines every rank's, weighted by strip size
``w_r = rows_r / height``::

    mean = sum_r w_r * mean_r
    var  = sum_r w_r * (var_r + (mean_r - mean)**2)

which is exactly the variance ``nn.GroupNorm`` computes over the whole image (biased), in a form
that cannot go negative. At synchronous steps every rank's statistics are fresh (an all-gather);
at displaced steps the other ranks' are from the previous step and this rank's are fresh
(DistriFusion's "corrected" statistics, written stably). Policies without ``global_norm`` use the
strip's own statistics.

Speed: the statistics are two plain reductions (the mean, then the mean squared deviation from
it), and the normalization is one ``batch_norm`` call in inference mode over ``(1, B * C, L)``
with the combined per-(sample, channel) mean and variance as its running statistics: both run at
about the speed of ``nn.GroupNorm``'s own kernel on the CPU. ``torch.var_mean`` over the same
data was 17 times slower than the two reductions, and the explicit ``(x - mean) * rstd * weight
+ bias`` took four passes (docs/BENCHMARKS.md).

Shapes: input ``(B, C, *spatial)`` -- this rank's strip (spatial is ``(h, W)``, or ``(h*W,)``
when called on a token sequence transposed to channels-first); output the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import Channel, RankRuntime
from .base import DisplacedModule, FlatBuffer

__all__ = ["StripGroupNorm"]


class StripGroupNorm(DisplacedModule):
    kind = "group_norm"

    def __init__(self, norm: nn.GroupNorm, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        self.norm = norm

    def _register(self, batch: int, device: torch.device) -> None:
        world = self.runtime.world_size
        groups = self.norm.num_groups
        self.stale = [FlatBuffer(batch * groups * 2, torch.float32, device) for _ in range(world)]
        self.send_buf = FlatBuffer(batch * groups * 2, torch.float32, device)
        plan = self.runtime.plan
        self.weights = torch.tensor([plan.rows(r) / plan.height for r in range(world)], dtype=torch.float32, device=device)
        self.stale_buffer_bytes = sum(b.nbytes for r, b in enumerate(self.stale) if r != self.runtime.rank)
        self._pending_recv.clear()
        self._pending_send.clear()
        self.mark_registered()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        if not runtime.policy.global_norm and not runtime.synchronous:
            return self.norm(x)
        batch = x.shape[0]
        if self.needs_registration():
            self._register(batch, x.device)
        groups = self.norm.num_groups
        local = _strip_statistics(x, groups)  # (B, G, 2)
        shape = (batch, groups, 2)

        # Same posting order on every rank (fresh exchange, next step's sends, next step's
        # receives), for transports that match messages by order alone (NCCL).
        post_next = runtime.next_step_displaced and runtime.policy.global_norm
        if runtime.synchronous:
            gathered = [torch.empty(shape, dtype=torch.float32, device=x.device) for _ in range(runtime.world_size)]
            runtime.all_gather(gathered, local.contiguous(), "norm", self.where("gathering group-norm statistics"))
            if post_next:
                self._post_sends(local, shape)
        else:
            if post_next:
                self._post_sends(local, shape)
            self.wait_received()
            gathered = [self.stale[r].view(shape) if r != runtime.rank else local for r in range(runtime.world_size)]
        mean, var = _combine_statistics(torch.stack(gathered, dim=0), self.weights)
        if post_next:
            self._post_recvs(shape)
        return self._normalize(x, mean, var)

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``x`` normalized with the whole image's ``mean`` and ``var`` ``(B, G)`` (float32), then
        the norm's affine transform: one inference-mode ``batch_norm`` over ``(1, B * C, L)``."""
        batch, channels = x.shape[:2]
        groups = self.norm.num_groups
        per_group = (batch, groups, channels // groups)
        # (B, G) -> (B * C,): expand and copy once (repeat_interleave took 2.5x as long on the CPU)
        running_mean = mean.unsqueeze(-1).expand(per_group).reshape(-1)
        running_var = var.unsqueeze(-1).expand(per_group).reshape(-1)
        weight = bias = None
        if self.norm.affine:  # float32 like the statistics: batch_norm takes a half input with float parameters
            weight, bias = self.norm.weight.float(), self.norm.bias.float()  # no copy when already float32
            if batch > 1:
                weight, bias = weight.repeat(batch), bias.repeat(batch)
        out = F.batch_norm(x.reshape(1, batch * channels, -1), running_mean, running_var, weight, bias,
                           training=False, momentum=0.0, eps=self.norm.eps)
        return out.reshape(x.shape)

    def _post_sends(self, local: torch.Tensor, shape: tuple[int, ...]) -> None:
        runtime = self.runtime
        self.wait_sent()
        send = self.send_buf.view(shape)
        send.copy_(local)
        for peer in range(runtime.world_size):
            if peer != runtime.rank:
                self._pending_send.append(
                    runtime.post_stale_send(send, peer, self.tag(Channel.NORM), "norm", self.where("sending statistics"))
                )

    def _post_recvs(self, shape: tuple[int, ...]) -> None:
        runtime = self.runtime
        for peer in range(runtime.world_size):
            if peer != runtime.rank:
                buf = self.stale[peer].view(shape)
                self._pending_recv.append(
                    runtime.post_stale_recv(buf, peer, self.tag(Channel.NORM), "norm", self.where("receiving statistics"))
                )


def _strip_statistics(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-(sample, group) mean and biased variance of the strip ``x`` ``(B, C, *spatial)``, in
    float32: ``(B, G, 2)``. Two passes (mean, then mean squared deviation), as stable as
    ``torch.var_mean`` and many times faster on the CPU."""
    grouped = x.reshape(x.shape[0], groups, -1).float()
    mean = grouped.mean(dim=-1, keepdim=True)
    var = (grouped - mean).square().mean(dim=-1)
    return torch.stack([mean.squeeze(-1), var], dim=-1)


def _combine_statistics(stats: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image's mean and biased variance ``(B, G)`` from every strip's ``stats``
    ``(N, B, G, 2)`` and the strips' shares of the rows ``weights`` ``(N,)`` (the formula of the
    module docstring)."""
    weights = weights.view(-1, 1, 1)
    mean = (weights * stats[..., 0]).sum(dim=0)
    var = (weights * (stats[..., 1] + (stats[..., 0] - mean) ** 2)).sum(dim=0)
    return mean, var
