"""Group normalization over a strip, with whole-image statistics.

Each rank computes, per (sample, group), the sum ``s_r`` and the sum of squares ``q_r`` of its
strip in float32, into its own row of the layer's statistics table ``(N, 2 * B * G)`` (one row
per rank: :meth:`~pcpp_runtime.context.StaleContext.norm_table`). With ``K`` the elements of one
group over the whole image, every rank's rows give::

    mean = sum_r s_r / K
    var  = max(0, sum_r q_r / K - mean**2)

one matrix-vector product over the table, whatever the number of ranks. At synchronous steps the
rows are all fresh (an all-gather), so this is ``nn.GroupNorm``'s biased variance over the whole
image; at displaced steps the other rows are the previous step's and this rank's is fresh
(DistriFusion's "corrected" statistics). Policies without ``global_norm`` use the strip's own
statistics at displaced steps.

Numerics: the second-moment form loses relative precision ``~1e-7 * (mean**2 + var) / var`` in
float32, against the two-pass form's ``~1e-7``; it is what lets the statistics of N ranks combine
in one product. The clamp keeps a variance that rounding took below zero from becoming NaN.

Host work: a call dispatches 8 kernel-launching operators at a displaced step (sum, norm and its
square into the table, the product, the copy to per-channel statistics, the variance and its
clamp, one ``batch_norm``) where the stock layer dispatches one (benchmarks/host_ops.py); two more
for a batch of more than one.

Speed: the normalization is one ``batch_norm`` in inference mode over ``(1, B * C, L)`` with the
combined per-(sample, channel) mean and variance as its running statistics and the norm's affine
parameters: about the speed of ``nn.GroupNorm``'s own kernel on the CPU. ``torch.var_mean`` over the
same data was 17 times slower than the plain reductions.

Shapes: input ``(B, C, *spatial)`` -- this rank's strip (spatial is ``(h, W)``, or ``(h*W,)``
when called on a token sequence transposed to channels-first); output the same.
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import RankRuntime
from .base import DisplacedModule

__all__ = ["StripGroupNorm"]


class StripGroupNorm(DisplacedModule):
    kind = "group_norm"

    def __init__(self, norm: nn.GroupNorm, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        self.norm = norm

    def _register(self, x: torch.Tensor) -> None:
        runtime = self.runtime
        batch, channels = x.shape[:2]
        groups = self.norm.num_groups
        self.cells = batch * groups  # (sample, group) pairs
        steps = runtime.displaced_steps if runtime.policy.global_norm else []
        runtime.context.declare_norm(self.layer_id, 2 * self.cells, steps, x.device)
        # K: elements of one group over the whole image (the strip's count, scaled by its share of the rows)
        plan = runtime.plan
        per_group = x[0].numel() // groups * plan.height // plan.rows(runtime.rank)
        self.weights = torch.full((runtime.world_size,), 1.0 / per_group, dtype=torch.float32, device=x.device)
        self.expand = (2, batch, groups, channels // groups)  # (mean | E[x^2]) per (sample, group) -> per channel
        self.mark_registered()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runtime = self.runtime
        if not runtime.policy.global_norm and not runtime.synchronous:
            return self.norm(x)
        if self.needs_registration():
            self._register(x)
        table = runtime.context.norm_table(self.layer_id)  # (N, 2 * B * G), float32
        own = table[runtime.rank]
        strip_sums(x, self.norm.num_groups, own)
        if runtime.synchronous:  # every rank's rows, fresh
            runtime.all_gather(list(table), own, "norm", self.where("gathering group-norm statistics"))
        mean, var = channel_moments(table, self.weights, self.expand)
        return self._normalize(x, mean, var)

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``x`` normalized with the whole image's per-(sample, channel) ``mean`` and ``var``
        ``(B * C,)`` (float32), then the norm's affine transform: one inference-mode
        ``batch_norm`` over ``(1, B * C, L)``."""
        batch, channels = x.shape[:2]
        weight = bias = None
        if self.norm.affine:  # float32 like the statistics: batch_norm takes a half input with float parameters
            weight, bias = self.norm.weight.float(), self.norm.bias.float()  # no copy when already float32
            if batch > 1:
                weight, bias = weight.repeat(batch), bias.repeat(batch)
        # native_batch_norm, not F.batch_norm: the same kernel without an empty reserve tensor
        out = torch.native_batch_norm(x.reshape(1, batch * channels, -1), weight, bias, mean, var, False, 0.0, self.norm.eps)[0]
        return out.reshape(x.shape)


def strip_sums(x: torch.Tensor, groups: int, row: torch.Tensor) -> None:
    """The strip's sum and sum of squares per (sample, group) of ``x`` ``(B, C, *spatial)``, in
    float32, into ``row`` ``(2 * B * G,)``: sums first, then sums of squares (each ``(B, G)``)."""
    grouped = x.reshape(x.shape[0], groups, -1)
    cells = grouped.shape[0] * groups
    squares = row[cells:].view(grouped.shape[:2])
    torch.sum(grouped, dim=-1, dtype=torch.float32, out=row[:cells].view(grouped.shape[:2]))
    torch.linalg.vector_norm(grouped, 2, dim=-1, dtype=torch.float32, out=squares)
    squares.square_()


def channel_moments(table: torch.Tensor, weights: torch.Tensor, expand: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image's mean and biased variance per (sample, channel), each ``(B * C,)``, from
    every rank's row of ``table`` ``(N, 2 * B * G)`` and ``weights`` ``(N,)`` (``1 / K`` each);
    ``expand`` is ``(2, B, G, C / G)``."""
    moments = torch.mv(table.t(), weights).view(expand[:3])  # mean and E[x^2] per (sample, group)
    per_channel = moments.unsqueeze(-1).expand(expand).contiguous().view(2, -1)  # one copy
    mean, square_mean = per_channel[0], per_channel[1]
    return mean, torch.addcmul(square_mean, mean, mean, value=-1).clamp_min_(0)
