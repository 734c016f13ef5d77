"""Model plans: how each family of diffusers denoiser is split into strips.

:func:`plan_for` picks the family's plan for a model; a model of an unknown family is refused
with the list of supported ones. docs/MODELS.md has the support table and how to add a family.
"""

from __future__ import annotations

import importlib

from torch import nn

from .base import LAYER_KINDS, LayerRule, ModelPlan, UnsupportedModelError

__all__ = ["LAYER_KINDS", "LayerRule", "ModelPlan", "UnsupportedModelError", "plan_for", "SUPPORTED_FAMILIES"]

#: denoiser class name -> family description
SUPPORTED_FAMILIES = {
    "UNet2DConditionModel": "Stable Diffusion 1.x/2.x and SDXL UNets",
    "PositionalUNet2DConditionModel": "the same UNets with a learnt position embedding after conv_in (the demo model)",
    "DiTTransformer2DModel": "DiT, class-conditional diffusion transformers",
    "PixArtTransformer2DModel": "PixArt-alpha and PixArt-sigma transformers",
}

#: denoiser class name -> "module:function" (in this package) building its ModelPlan
_PLAN_BUILDERS = {
    "UNet2DConditionModel": "unet:unet_plan",
    "PositionalUNet2DConditionModel": "unet:unet_plan",
    "DiTTransformer2DModel": "dit:dit_plan",
    "PixArtTransformer2DModel": "dit:pixart_plan",
}


def plan_for(model: nn.Module) -> ModelPlan:
    """The plan of ``model``'s family; :class:`UnsupportedModelError` for unknown ones."""
    name = type(model).__name__
    builder = _PLAN_BUILDERS.get(name)
    if builder is None:
        supported = "; ".join(f"{cls} ({desc})" for cls, desc in SUPPORTED_FAMILIES.items())
        raise UnsupportedModelError(
            f"no plan for a {name}; supported: {supported}. To add one, write a function returning a "
            f"ModelPlan in pcpp_runtime/models/plans/<family>.py and register it for plan_for in _PLAN_BUILDERS "
            f"and SUPPORTED_FAMILIES of pcpp_runtime/models/plans/__init__.py (see docs/MODELS.md)"
        )
    module_name, function = builder.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, function)(model)
