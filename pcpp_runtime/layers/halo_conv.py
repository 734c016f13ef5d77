"""Convolutions over a strip: halo rows from the neighbours, or from the full input.

A k x k convolution (stride s, padding p, dilation d; effective height K = d(k-1)+1) over rows
``[start, end)`` of its input needs ``p`` rows above the strip and ``max(0, K - p - s)`` rows
below it (strips start on multiples of s). The strip is padded with those rows -- zeros at the
image edge, as the original zero padding -- and convolved with no vertical padding.

* :class:`HaloConv2d` gets the rows from the neighbours: fresh and blocking at synchronous steps;
  at displaced steps the rows sent during the previous step, while this step's rows are sent for
  the next one (the exchange overlaps a whole step of compute).
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
from .base import DisplacedModule, FlatBuffer

__all__ = ["FirstConv2d", "HaloConv2d", "halo_rows"]


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
    """A k x k convolution whose halo rows come from the neighbouring ranks."""

    def _register(self, x: torch.Tensor) -> None:
        batch, channels, _, width = x.shape
        make = lambda rows: FlatBuffer(batch * channels * rows * width, x.dtype, x.device)  # noqa: E731
        self.recv_above = make(self.above)  # the rank above's last `above` rows
        self.recv_below = make(self.below)  # the rank below's first `below` rows
        self.send_up = make(self.below)  # my first rows, for the rank above
        self.send_down = make(self.above)  # my last rows, for the rank below
        self.zeros_above = x.new_zeros(batch, channels, self.above, width)
        self.zeros_below = x.new_zeros(batch, channels, self.below, width)
        self.stale_buffer_bytes = self.recv_above.nbytes + self.recv_below.nbytes
        self._pending_recv.clear()
        self._pending_send.clear()
        self.mark_registered()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_registration():
            self._register(x)
        runtime = self.runtime
        above_rank, below_rank = runtime.plan.neighbours(runtime.rank)
        batch, channels, rows, width = x.shape
        if rows < max(self.above, self.below):
            raise RuntimeError(f"{self.path}: strip of {rows} rows is thinner than the halo the convolution needs")
        shape_above = (batch, channels, self.above, width)
        shape_below = (batch, channels, self.below, width)
        has_above = above_rank is not None and self.above > 0
        has_below = below_rank is not None and self.below > 0

        # Posting order is the same on every rank (fresh exchange, then next step's sends, then
        # next step's receives), so transports that match messages by order alone (NCCL) pair
        # them right.
        post_next = runtime.next_step_displaced
        if runtime.synchronous:
            top, bottom = self._exchange_fresh(x, above_rank, below_rank, shape_above, shape_below)
            if post_next:
                self._post_sends(x, above_rank, below_rank, shape_above, shape_below)
        else:
            if post_next:  # send this step's rows now: they travel while this step computes
                self._post_sends(x, above_rank, below_rank, shape_above, shape_below)
            self.wait_received()
            top = self.recv_above.view(shape_above) if has_above else self.zeros_above
            bottom = self.recv_below.view(shape_below) if has_below else self.zeros_below
        out = self._convolve(top, x, bottom)
        if post_next:  # the stale buffers are free again: receive into them for the next step
            self._post_recvs(above_rank, below_rank, shape_above, shape_below)
        return out

    def _exchange_fresh(self, x, above_rank, below_rank, shape_above, shape_below):
        runtime = self.runtime
        step = runtime.step
        works = []
        top, bottom = self.zeros_above, self.zeros_below
        # fresh halos use separate receive tensors so the stale buffers stay untouched
        if above_rank is not None and self.above > 0:
            top = x.new_empty(shape_above)
            works.append(runtime.post_recv(top, above_rank, self.tag(Channel.SYNC_HALO_FROM_ABOVE), "halo", step))
        if below_rank is not None and self.below > 0:
            bottom = x.new_empty(shape_below)
            works.append(runtime.post_recv(bottom, below_rank, self.tag(Channel.SYNC_HALO_FROM_BELOW), "halo", step))
        up = x[:, :, : self.below].contiguous() if above_rank is not None and self.below > 0 else None
        down = x[:, :, x.shape[2] - self.above :].contiguous() if below_rank is not None and self.above > 0 else None
        if up is not None:
            works.append(runtime.post_send(up, above_rank, self.tag(Channel.SYNC_HALO_FROM_BELOW), "halo", step))
        if down is not None:
            works.append(runtime.post_send(down, below_rank, self.tag(Channel.SYNC_HALO_FROM_ABOVE), "halo", step))
        for work in works:
            runtime.wait(work, self.where("exchanging fresh halo rows"))
        return top, bottom

    def _post_sends(self, x, above_rank, below_rank, shape_above, shape_below) -> None:
        runtime = self.runtime
        where = self.where("sending halo rows")
        self.wait_sent()  # the send buffers still hold the previous step's rows until then
        if above_rank is not None and self.below > 0:
            up = self.send_up.view(shape_below)
            up.copy_(x[:, :, : self.below])
            self._pending_send.append(runtime.post_stale_send(up, above_rank, self.tag(Channel.HALO_FROM_BELOW), "halo", where))
        if below_rank is not None and self.above > 0:
            down = self.send_down.view(shape_above)
            down.copy_(x[:, :, x.shape[2] - self.above :])
            self._pending_send.append(
                runtime.post_stale_send(down, below_rank, self.tag(Channel.HALO_FROM_ABOVE), "halo", where)
            )

    def _post_recvs(self, above_rank, below_rank, shape_above, shape_below) -> None:
        runtime = self.runtime
        where = self.where("receiving halo rows")
        if above_rank is not None and self.above > 0:
            buf = self.recv_above.view(shape_above)
            self._pending_recv.append(runtime.post_stale_recv(buf, above_rank, self.tag(Channel.HALO_FROM_ABOVE), "halo", where))
        if below_rank is not None and self.below > 0:
            buf = self.recv_below.view(shape_below)
            self._pending_recv.append(runtime.post_stale_recv(buf, below_rank, self.tag(Channel.HALO_FROM_BELOW), "halo", where))
