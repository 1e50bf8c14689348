"""Backbones: the registry, the interface, and the paper's host networks with MSGC blocks."""
from .base import Backbone, GatedBlock
from .build import BACKBONE_REGISTRY, build_backbone
from . import resnet  # noqa: F401  (registers msgc_resnet*)

__all__ = ["BACKBONE_REGISTRY", "Backbone", "GatedBlock", "build_backbone"]
from . import mobilenetv2  # noqa: F401  (registers msgc_mobilenetv2)
from . import condensenet  # noqa: F401  (registers msgc_condensenet)
