"""Backbones: the registry, the interface, the paper's host networks and new hosts with MSGC blocks."""
from .base import Backbone, GatedBlock
from .build import BACKBONE_REGISTRY, build_backbone
from . import resnet  # noqa: F401  (registers msgc_resnet*, msgc_resnext50_32x4d, msgc_wide_resnet50_2)
from . import mobilenetv2  # noqa: F401  (registers msgc_mobilenetv2)
from . import condensenet  # noqa: F401  (registers msgc_condensenet)
from . import regnet  # noqa: F401  (registers msgc_regnet_y_800mf)

__all__ = ["BACKBONE_REGISTRY", "Backbone", "GatedBlock", "build_backbone"]
