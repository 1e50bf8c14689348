"""The backbone registry and its builder."""
from ...utils.registry import Registry
from ...utils.errors import InvalidValueError
from ..attention import build_attention
from ..budget import check_budget_range
from ..grouping import build_grouping
from ..layers import budget_generators

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
    budget_range = check_budget_range(m.MSGC.BUDGET_RANGE)
    grouping = build_grouping(m.MSGC.GROUPING, heads=m.MSGC.HEADS, temperature=m.MSGC.TEMPERATURE,
                              gate_bias=m.MSGC.GATE_BIAS, budget_range=budget_range)
    attention = build_attention(m.MSGC.ATTENTION)
    backbone = BACKBONE_REGISTRY.get(m.BACKBONE.NAME)(
        grouping=grouping, attention=attention, num_classes=m.NUM_CLASSES,
        width_mult=m.BACKBONE.WIDTH_MULT, stem=m.BACKBONE.STEM)
    if budget_range is not None and not budget_generators(backbone):
        raise InvalidValueError(f"MODEL.MSGC.BUDGET_RANGE {list(budget_range)} needs mask generators; grouping "
                                f"'{m.MSGC.GROUPING}' of {m.BACKBONE.NAME} has none (its MACs are fixed): remove it")
    return backbone
