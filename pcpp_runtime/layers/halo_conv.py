"""Convolutions over a strip: halo rows from the neighbours, or from the full input.

A k x k convolution (stride s, padding p, dilation d; effective height K = d(k-1)+1) over rows
``[start, end)`` of its input needs ``p`` rows above the strip and ``max(0, K - p - s)`` rows
below it (strips start on multiples of s). The strip is padded with those rows -- zeros at the
image edge, as the original zero padding -- and convolved with no vertical padding.

* :class:`HaloConv2d` gets the rows from the neighbours: fresh and blocking at synchronous steps;
  at displaced steps the rows sent during the previous step, read from the stale context
  (:mod:`pcpp_runtime.context`), while this step's rows are written there for the next one.
* :class:`FirstConv2d` (``conv_in``, whose input is the latent every rank holds) cuts them from
  the full input: exact, no communication.

Shapes: input ``(B, C_in, h, W)`` -- this rank's strip at the layer's resolution; output
``(B, C_out, h / s, W')``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import Channel, RankRuntime
from .base import DisplacedModule

__all__ = ["FirstConv2d", "HaloConv2d", "halo_rows"]

#: the channel of a synchronous step's fresh rows, for each stale halo channel
_FRESH_CHANNEL = {Channel.HALO_FROM_BELOW: Channel.SYNC_HALO_FROM_BELOW, Channel.HALO_FROM_ABOVE: Channel.SYNC_HALO_FROM_ABOVE}


def halo_rows(conv: nn.Conv2d) -> tuple[int, int]:
    """(rows needed above, rows needed below) a strip for ``conv``."""
    if conv.padding_mode != "zeros":
        raise ValueError(f"only zero-padded convolutions can be split into strips, got padding_mode={conv.padding_mode!r}")
    if isinstance(conv.padding, str):
        raise ValueError(f"convolution padding {conv.padding!r} is not supported; give explicit integers")
    pad = conv.padding[0]
    stride = conv.stride[0]
    effective = conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    return pad, max(0, effective - pad - stride)


class _StripConv(DisplacedModule):
    kind = "conv"

    def __init__(self, conv: nn.Conv2d, layer_id: int, path: str, runtime: RankRuntime) -> None:
        super().__init__(layer_id, path, runtime)
        self.conv = conv
        self.above, self.below = halo_rows(conv)

    def _convolve(self, top: torch.Tensor, x: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        padded = torch.cat([top, x, bottom], dim=2) if (top.shape[2] or bottom.shape[2]) else x
        return F.conv2d(padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


class FirstConv2d(_StripConv):
    """The model's first convolution: halo rows are cut from the full latent (no messages)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.runtime.full_input
        if full is None or full.shape[2] != self.runtime.plan.height:
            raise RuntimeError(f"{self.path}: the full latent was not recorded for this call")
        start, end = self.runtime.bounds
        height = full.shape[2]
        top = full[:, :, max(0, start - self.above) : start]
        bottom = full[:, :, end : min(height, end + self.below)]
        if top.shape[2] < self.above:
            top = torch.cat([x.new_zeros(x.shape[0], x.shape[1], self.above - top.shape[2], x.shape[3]), top], dim=2)
        if bottom.shape[2] < self.below:
            bottom = torch.cat([bottom, x.new_zeros(x.shape[0], x.shape[1], self.below - bottom.shape[2], x.shape[3])], dim=2)
        return self._convolve(top, x, bottom)


class HaloConv2d(_StripConv):
    """A k x k convolution whose halo rows come from the neighbouring ranks.

    Registered on its first call of a generation: the stale rows it sends each neighbour and
    receives from it at every displaced step (:class:`~pcpp_runtime.context.StaleContext`), the
    zero rows of the image edge, and the receive buffers of the fresh (synchronous) exchange.
    """

    def _register(self, x: torch.Tensor) -> None:
        runtime = self.runtime
        batch, channels, _, width = x.shape
        self.shape_above = (batch, channels, self.above, width)  # rows the rank above sends down
        self.shape_below = (batch, channels, self.below, width)  # rows the rank below sends up
        above_rank, below_rank = runtime.plan.neighbours(runtime.rank)
        # (peer, channel, shape) of each message: the rows a neighbour needs, and the rows it gives
        self.sends = []
        self.receives = []
        if above_rank is not None:
            if self.below > 0:  # my first rows are the bottom halo of the rank above
                self.sends.append((above_rank, Channel.HALO_FROM_BELOW, self.shape_below, slice(0, self.below)))
            if self.above > 0:
                self.receives.append((above_rank, Channel.HALO_FROM_ABOVE, self.shape_above))
        if below_rank is not None:
            if self.above > 0:  # my last rows are the top halo of the rank below
                self.sends.append((below_rank, Channel.HALO_FROM_ABOVE, self.shape_above, slice(-self.above, None)))
            if self.below > 0:
                self.receives.append((below_rank, Channel.HALO_FROM_BELOW, self.shape_below))
        steps = runtime.displaced_steps
        context = runtime.context
        for peer, channel, shape, _ in self.sends:
            context.declare(self.layer_id, channel, peer, send=True, shapes={s: shape for s in steps}, kind="halo",
                            dtype=x.dtype, device=x.device)
        for peer, channel, shape in self.receives:
            context.declare(self.layer_id, channel, peer, send=False, shapes={s: shape for s in steps}, kind="halo",
                            dtype=x.dtype, device=x.device)
        self.above_rank = above_rank if self.above > 0 else None
        self.below_rank = below_rank if self.below > 0 else None
        self.zeros_above = x.new_zeros(self.shape_above)
        self.zeros_below = x.new_zeros(self.shape_below)
        self.fresh_above = x.new_empty(self.shape_above)  # fresh rows of a synchronous step
        self.fresh_below = x.new_empty(self.shape_below)
        self.mark_registered()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_registration():
            self._register(x)
        runtime = self.runtime
        if x.shape[2] < max(self.above, self.below):
            raise RuntimeError(f"{self.path}: strip of {x.shape[2]} rows is thinner than the halo the convolution needs")
        if runtime.synchronous:
            top, bottom = self._exchange_fresh(x)
            if runtime.next_step_displaced:
                self._write_outgoing(x)
        else:
            context = runtime.context
            top = self.zeros_above if self.above_rank is None else context.stale(self.layer_id, Channel.HALO_FROM_ABOVE, self.above_rank)
            bottom = self.zeros_below if self.below_rank is None else context.stale(self.layer_id, Channel.HALO_FROM_BELOW, self.below_rank)
            self._write_outgoing(x)  # also at the last step: harmless, and the same graph every displaced step
        return self._convolve(top, x, bottom)

    def _write_outgoing(self, x: torch.Tensor) -> None:
        """This step's boundary rows, into the stale context of the next step."""
        for peer, channel, _, rows in self.sends:
            self.runtime.context.outgoing(self.layer_id, channel, peer).copy_(x[:, :, rows])

    def _exchange_fresh(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A synchronous step: this step's rows from the neighbours, blocking."""
        runtime = self.runtime
        step = runtime.step
        works = []
        top = self.zeros_above if self.above_rank is None else self.fresh_above
        bottom = self.zeros_below if self.below_rank is None else self.fresh_below
        if self.above_rank is not None:
            works.append(runtime.post_recv(top, self.above_rank, self.tag(Channel.SYNC_HALO_FROM_ABOVE), "halo", step))
        if self.below_rank is not None:
            works.append(runtime.post_recv(bottom, self.below_rank, self.tag(Channel.SYNC_HALO_FROM_BELOW), "halo", step))
        for peer, channel, _, rows in self.sends:
            works.append(runtime.post_send(x[:, :, rows].contiguous(), peer, self.tag(_FRESH_CHANNEL[channel]), "halo", step))
        for work in works:
            runtime.wait(work, self.where("exchanging fresh halo rows"))
        return top, bottom
