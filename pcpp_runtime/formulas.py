"""Bytes per step from first principles, to check the engine's and the transports' counts.

For rank r of N, at a displaced step (after warm-up), with B the batch (2x with guidance), e the
element size, and for each layer its resolution level (h_q rows of rank q's strip, W columns):

    attention_kv = sum over self-attention layers, over peers q the policy names for r:
                       rows_q * W * B * 2 * inner_dim * e       (keys and values)
                   full: rows_q = h_q for every q != r;  partial(p): round(p * h_q) for q = r +- 1
    halo         = sum over k x k convolutions (not the first):
                       ([r > 0] * above + [r < N-1] * below) * W * B * C_in * e
                   (above = padding rows, below = max(0, K - padding - stride) rows)
    norm         = sum over group norms: (N - 1) * B * G * 2 * 4     (mean, variance; float32)
                   0 for policies with local statistics (``none``)
    output       = B * C_out * (H - h_r) * W * e                       (the output all-gather)

At synchronous steps attention_kv uses every peer's whole strip and norm is always counted.

The layer shapes come from one probe pass of the unsplit model on the given input (forward
hooks record each planned layer's input), so this module shares no code with the engine's
exchanges.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import ParallelConfig
from .models.plans.base import ModelPlan
from .partition import PatchPlan
from .policies import AttentionLayerView

__all__ = ["LayerShape", "expected_bytes_per_step", "probe_layer_shapes"]


class LayerShape(dict):
    """``{"path", "kind", "channels", "rows", "width", ...}`` of one planned layer, full image."""


def probe_layer_shapes(model: nn.Module, plan: ModelPlan, *args: Any, **kwargs: Any) -> list[LayerShape]:
    """Run ``model(*args, **kwargs)`` once unsplit and record each planned layer's input shape."""
    shapes: list[LayerShape] = []
    handles = []
    for rule in plan.layers:
        module = model.get_submodule(rule.path)

        def record(mod, inputs, kwargs_, rule=rule):
            hidden = inputs[0] if inputs else kwargs_["hidden_states"]
            entry = LayerShape(path=rule.path, kind=rule.kind, shape=tuple(hidden.shape), dtype=hidden.dtype)
            if rule.kind in ("halo_conv", "first_conv"):
                pad = mod.padding[0]
                effective = mod.dilation[0] * (mod.kernel_size[0] - 1) + 1
                entry.update(above=pad, below=max(0, effective - pad - mod.stride[0]), channels=hidden.shape[1])
            elif rule.kind == "group_norm":
                entry.update(groups=mod.num_groups)
            elif rule.kind == "self_attention":
                entry.update(inner=mod.to_k.out_features, tokens=_tokens(hidden))
            shapes.append(entry)

        handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _tokens(hidden: torch.Tensor) -> int:
    return hidden.shape[1] if hidden.dim() == 3 else hidden.shape[2] * hidden.shape[3]


def expected_bytes_per_step(
    shapes: list[LayerShape],
    patch_plan: PatchPlan,
    model_plan: ModelPlan,
    config: ParallelConfig,
    rank: int,
    step: int,
    num_steps: int,
    synchronous: bool,
    batch: int,
    element_size: int,
) -> dict[str, int]:
    """Bytes ``rank`` receives for ``step``'s compute, by kind (see the module docstring)."""
    policy = config.make_policy()
    world = patch_plan.world_size
    above, below = patch_plan.neighbours(rank)
    out = {"attention_kv": 0, "halo": 0, "norm": 0, "output": 0}
    layer_ids = {rule.path: i + 1 for i, rule in enumerate(model_plan.layers)}
    for entry in shapes:
        kind = entry["kind"]
        if kind == "halo_conv":
            _, channels, _, width = entry["shape"]
            rows_in = (entry["above"] if above is not None else 0) + (entry["below"] if below is not None else 0)
            out["halo"] += rows_in * width * batch * channels * element_size
        elif kind == "group_norm" and (synchronous or policy.global_norm):
            out["norm"] += (world - 1) * batch * entry["groups"] * 2 * 4
        elif kind == "self_attention":
            factor = math.isqrt(patch_plan.height * patch_plan.width // entry["tokens"])
            bounds = patch_plan.level_bounds(factor)
            width = patch_plan.width // factor
            if synchronous:
                rows = {q: e - s for q, (s, e) in enumerate(bounds) if q != rank}
            else:
                view = AttentionLayerView(layer_ids[entry["path"]], entry["path"], rank, bounds, width, num_steps)
                rows = {q: e - s for q, (s, e) in policy.attention_rows(view, step).items()}
            out["attention_kv"] += sum(rows.values()) * width * batch * 2 * entry["inner"] * element_size
    out["output"] = batch * model_plan.output_channels * (patch_plan.height - patch_plan.rows(rank)) * patch_plan.width * element_size
    out["total"] = sum(out.values())
    return out
