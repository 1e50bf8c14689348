"""Groupings: how the heads of a gated convolution choose their input channels.

``GROUPING_REGISTRY`` holds one entry per strategy; :func:`build_grouping` makes one by name.
"""
from typing import Optional

import torch
from ..utils.errors import InvalidValueError
from ..utils.registry import Registry
from torch import nn

from .layers import MaskGenerator

__all__ = ["GROUPING_REGISTRY", "Grouping", "build_grouping", "StaticMask"]

GROUPING_REGISTRY = Registry("GROUPING")
GROUPING_REGISTRY.__doc__ = """
Registry for groupings, selected by ``MODEL.MSGC.GROUPING``.

An entry is a :class:`Grouping` subclass, constructed as ``entry(heads=int, temperature=float,
gate_bias=float)``, and with ``budget_range=(lo, hi)`` when ``MODEL.MSGC.BUDGET_RANGE`` is set.
Backbones call its ``head_mask`` for every multi-head (grouped) convolution and its ``channel_mask``
for every single-head input mask, and build the grouped convolutions with ``groups = grouping.heads``.
"""


class Grouping:
    """Base class of groupings; the defaults describe the dense host (no gates, one head).

    Attributes:
        name: the registered name.
        heads: the ``groups`` of every gated convolution.
        budget_range: ``(lo, hi)``: the mask generators take the MAC budget as an input
            (``MODEL.MSGC.BUDGET_RANGE``); None: the paper's generators.
    """

    name = "dense"

    def __init__(self, heads: int = 4, temperature: float = 2.0 / 3.0, gate_bias: float = 2.0,
                 budget_range: Optional[tuple] = None):
        if heads < 1:
            raise InvalidValueError(f"MODEL.MSGC.HEADS must be >= 1, got {heads}")
        self.heads = heads
        self.temperature = temperature
        self.gate_bias = gate_bias
        self.budget_range = tuple(budget_range) if budget_range else None

    def head_mask(self, in_channels: int, channels: int, reduction: int) -> Optional[nn.Module]:
        """A module mapping a context ``N x in_channels x 1 x 1`` to ``N x heads x channels`` in {0, 1}
        (with a ``macs`` attribute: its cost per sample), or None when every head reads every channel."""
        return None

    def channel_mask(self, in_channels: int, channels: int, reduction: int) -> Optional[nn.Module]:
        """Like :meth:`head_mask` for a single-head input mask (``N x 1 x channels``), or None."""
        return None

    def _generator(self, in_channels, channels, heads, reduction):
        return MaskGenerator(in_channels, channels, heads, reduction, self.temperature, self.gate_bias,
                             self.budget_range)

    def __repr__(self):
        return f"{type(self).__name__}(heads={self.heads})"


@GROUPING_REGISTRY.register("dense")
class DenseGrouping(Grouping):
    """No gate at all: exactly the host network (one head, every channel read)."""

    def __init__(self, heads: int = 4, **kwargs):
        super().__init__(1, **kwargs)


@GROUPING_REGISTRY.register("msgc")
class MSGCGrouping(Grouping):
    """The paper: per-sample masks decide which channels each head reads, and single-head input masks."""

    name = "msgc"

    def head_mask(self, in_channels, channels, reduction):
        return self._generator(in_channels, channels, self.heads, reduction)

    def channel_mask(self, in_channels, channels, reduction):
        return self._generator(in_channels, channels, 1, reduction)


@GROUPING_REGISTRY.register("msgc_heads")
class MSGCHeadsGrouping(MSGCGrouping):
    """MSGC's per-sample head masks without its single-head input masks: every convolution that the
    paper gates with one head (a block's first) stays dense, as in the static grouping, so the MACs are
    saved in the grouped convolutions only (an ablation; not the paper's model)."""

    name = "msgc_heads"

    def channel_mask(self, in_channels, channels, reduction):
        return None


@GROUPING_REGISTRY.register("prune")
class PruneGrouping(MSGCGrouping):
    """One head: dynamic channel pruning (every mask is a single-head gate)."""

    name = "prune"

    def __init__(self, heads: int = 4, **kwargs):
        super().__init__(1, **kwargs)


class StaticMask(nn.Module):
    """A fixed ``heads x channels`` mask: head i reads its contiguous slice of ``channels / heads``."""

    macs = 0

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise InvalidValueError(f"static grouping: {heads} heads do not divide {channels} channels")
        mask = torch.zeros(heads, channels)
        for i in range(heads):
            mask[i, i * channels // heads:(i + 1) * channels // heads] = 1
        self.register_buffer("mask", mask, persistent=False)
        self.heads, self.channels = heads, channels

    def forward(self, context):
        return self.mask.to(context.dtype).expand(context.size(0), -1, -1)


@GROUPING_REGISTRY.register("static")
class StaticGrouping(Grouping):
    """Conventional grouped convolution: head i reads only its fixed slice; no gate."""

    name = "static"

    def head_mask(self, in_channels, channels, reduction):
        return StaticMask(channels, self.heads)


def build_grouping(name: str, heads: int = 4, temperature: float = 2.0 / 3.0,
                   gate_bias: float = 2.0, budget_range: Optional[tuple] = None) -> Grouping:
    """Build the grouping registered as ``name`` (an unknown name lists the registered ones); with
    ``budget_range`` its generators take the MAC budget as an input."""
    extra = {"budget_range": tuple(budget_range)} if budget_range else {}  # registered groupings may not take it
    return GROUPING_REGISTRY.get(name)(heads=heads, temperature=temperature, gate_bias=gate_bias, **extra)
