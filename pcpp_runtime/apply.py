"""Attach a model plan's displaced layers to a model, and remove them again."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

from torch import nn

from .layers import DisplacedLayer, FirstConv2d, HaloConv2d, StripGroupNorm, StripPatchEmbed, StripPositionEmbedding, StripSelfAttention
from .models.plans.base import ModelPlan, UnsupportedModelError
from .runtime import RankRuntime

__all__ = ["AppliedPlan", "apply_plan"]

_MODULE_LAYERS = {
    "first_conv": FirstConv2d,
    "halo_conv": HaloConv2d,
    "group_norm": StripGroupNorm,
    "patch_embed": StripPatchEmbed,
    "position_embedding": StripPositionEmbedding,
}


@dataclasses.dataclass
class AppliedPlan:
    """The displaced layers attached to one model, and how to take them off."""

    layers: list[DisplacedLayer]
    _undo: list[Callable[[], None]]

    def remove(self) -> None:
        """Restore the original modules and attention processors."""
        while self._undo:
            self._undo.pop()()


def apply_plan(model: nn.Module, plan: ModelPlan, runtime: RankRuntime) -> AppliedPlan:
    """Replace every module the plan names with its strip-local layer (weights are shared).

    In eager mode a forward hook after each displaced layer lets the stale context send what the
    layer wrote as soon as it is written (:meth:`~pcpp_runtime.context.StaleContext.after_layer`):
    a hook between layers, outside any layer's own forward."""
    layers: list[DisplacedLayer] = []
    undo: list[Callable[[], None]] = []
    applied = AppliedPlan(layers, undo)
    try:
        for index, rule in enumerate(plan.layers):
            layer_id = index + 1  # 0 is the output gather
            original = model.get_submodule(rule.path)
            if rule.kind == "self_attention":
                layer = StripSelfAttention(layer_id, rule.path, runtime)
                previous = original.processor
                original.set_processor(layer)
                undo.append(lambda module=original, proc=previous: module.set_processor(proc))
                module = original
            else:
                layer = module = _MODULE_LAYERS[rule.kind](original, layer_id, rule.path, runtime)
                model.set_submodule(rule.path, layer)
                undo.append(lambda path=rule.path, module=original: model.set_submodule(path, module))
            if runtime.context.eager_posting:
                hook = module.register_forward_hook(lambda *_, layer_id=layer_id: runtime.context.after_layer(layer_id))
                undo.append(hook.remove)
            layers.append(layer)
        if plan.strip_forward is not None:
            _install_forward(model, plan, undo)
    except (ValueError, AttributeError) as exc:
        applied.remove()
        raise UnsupportedModelError(f"cannot apply the {plan.family} plan: {exc}") from exc
    return applied


def _install_forward(model: nn.Module, plan: ModelPlan, undo: list[Callable[[], None]]) -> None:
    """Shadow the model's class ``forward`` with the plan's strip-aware one (an instance
    attribute, so ``nn.Module.__call__`` and its hooks are unchanged); undo deletes it."""
    if "forward" in vars(model):
        # someone else (accelerate's offloading hooks, say) already wraps this instance's forward
        raise ValueError(f"the {type(model).__name__} instance already has a patched forward; the plan needs its own")
    model.forward = types.MethodType(plan.strip_forward, model)
    undo.append(lambda: delattr(model, "forward"))
