"""Model families: how each kind of diffusers denoiser is split into strips, plus small models.

:func:`plan_for` picks the family's plan for a model; a model of an unknown family is refused
with the list of supported ones.
"""

from __future__ import annotations

from torch import nn

from .plan import LAYER_KINDS, LayerRule, ModelPlan, UnsupportedModelError

__all__ = ["LAYER_KINDS", "LayerRule", "ModelPlan", "UnsupportedModelError", "plan_for", "SUPPORTED_FAMILIES"]

#: class name -> (family description, plan builder module:function)
SUPPORTED_FAMILIES = {
    "UNet2DConditionModel": "Stable Diffusion 1.x/2.x and SDXL UNets",
}


def plan_for(model: nn.Module) -> ModelPlan:
    """The plan of ``model``'s family; :class:`UnsupportedModelError` for unknown ones."""
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        from .unet import unet_plan

        return unet_plan(model)
    supported = "; ".join(f"{cls} ({desc})" for cls, desc in SUPPORTED_FAMILIES.items())
    raise UnsupportedModelError(
        f"no plan for a {name}; supported: {supported}. To add one, write a function returning a "
        f"ModelPlan in pcpp_runtime/models/ and register it in plan_for"
    )
