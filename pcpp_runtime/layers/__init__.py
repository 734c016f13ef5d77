"""Displaced layers: strip-local versions of the layers that mix positions."""

from .attention import StripSelfAttention
from .base import DisplacedLayer, DisplacedModule
from .group_norm import StripGroupNorm
from .halo_conv import FirstConv2d, HaloConv2d, halo_rows
from .patch_embed import StripPatchEmbed
from .position_embedding import StripPositionEmbedding

__all__ = ["DisplacedLayer", "DisplacedModule", "FirstConv2d", "HaloConv2d", "StripGroupNorm", "StripPatchEmbed", "StripPositionEmbedding", "StripSelfAttention", "halo_rows"]
