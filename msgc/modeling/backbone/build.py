"""The backbone registry and its builder."""
from ...utils.registry import Registry
from ..attention import build_attention
from ..grouping import build_grouping

__all__ = ["BACKBONE_REGISTRY", "build_backbone"]

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = """
Registry for backbones, selected by ``MODEL.BACKBONE.NAME``.

An entry is a callable invoked with keyword arguments ``grouping`` (a :class:`Grouping`),
``attention`` (an attention entry), ``num_classes`` (int), ``width_mult`` (float) and ``stem``
("imagenet" or "cifar"), returning a :class:`msgc.modeling.backbone.Backbone`: a module with
``forward_features(x) -> (stages, macs)``, ``forward_head(stages) -> logits`` and
``complexity(h, w) -> Costs``. Register your own with ``@BACKBONE_REGISTRY.register()`` in your module
and import that module before building.
"""


def build_backbone(cfg):
    """Build the backbone named by ``cfg.MODEL.BACKBONE.NAME`` with the grouping and attention of cfg."""
    m = cfg.MODEL
    grouping = build_grouping(m.MSGC.GROUPING, heads=m.MSGC.HEADS, temperature=m.MSGC.TEMPERATURE,
                              gate_bias=m.MSGC.GATE_BIAS)
    attention = build_attention(m.MSGC.ATTENTION)
    return BACKBONE_REGISTRY.get(m.BACKBONE.NAME)(
        grouping=grouping, attention=attention, num_classes=m.NUM_CLASSES,
        width_mult=m.BACKBONE.WIDTH_MULT, stem=m.BACKBONE.STEM)
