"""The interface every backbone implements, and helpers shared by the gated blocks."""
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..kit import BlockSpec
from ..layers import Generator
from ..macs import Costs, MaskStats

__all__ = ["Backbone", "GatedBlock"]


class GatedBlock(nn.Module):
    """A block whose gated convolutions are decided from a pooled value of the block (its context).

    A subclass creates its modules, then describes its computation with the kit
    (:meth:`describe`, :mod:`msgc.modeling.kit`); its forward pass, static costs (:meth:`costs`) and
    per-sample MACs (:meth:`sample_macs`, which the deployed network calls too) follow from the
    description, and :mod:`msgc.deploy` deploys it without code of its own.

    Protocol (the backbone's forward)::

        out, macs = block((x, macs))      # macs: N per-sample MACs so far (float64)
    """

    spec: Optional[BlockSpec] = None

    def describe(self, in_channels: int, where: str = "", context_cost: str = "generators") -> BlockSpec:
        """Start the block's description over an input of ``in_channels`` channels (see the kit)."""
        self.spec = BlockSpec(self, in_channels, where or type(self).__name__, context_cost)
        return self.spec

    def _spec(self) -> BlockSpec:
        if self.spec is None or self.spec.result is None:
            raise NotImplementedError(f"{type(self).__name__}: describe the block with self.describe(...) and "
                                      "end the description with .output(value)")
        return self.spec

    @property
    def uses_context(self) -> bool:
        """Whether some generator reads the context (else it is not pooled)."""
        return any(isinstance(m, Generator) for g in self._spec().gates for m in (g.mask, g.attention))

    def costs(self, h: int, w: int) -> Tuple[Costs, int, int]:
        """The block's static costs on an ``h x w`` input, and its output size."""
        return self._spec().costs(h, w)

    def sample_macs(self, h: int, w: int, *masks: MaskStats):
        """The paper's MACs of the block on an ``h x w`` input from its gates' :class:`MaskStats`
        (in the order the gates were described)."""
        return self._spec().sample_macs(h, w, masks)

    def forward(self, x_macs):
        x, macs = x_macs
        out, masks = self._spec().forward(x, self.uses_context)
        stats = [MaskStats.of(m, x.size(0), x) for m in masks]
        return out, macs + self.sample_macs(x.size(2), x.size(3), *stats)


class Backbone(nn.Module):
    """A classification network split into ``forward_features`` (named stages) and ``forward_head``.

    Subclasses set ``stage_channels`` and ``stage_strides`` (stage name -> channels / stride) and
    implement ``forward_features(x) -> (OrderedDict of stage outputs, macs)``, ``forward_head(features)``
    ``head_macs(h, w)`` and ``complexity(h, w) -> Costs`` (the whole network, head included); ``macs`` is
    each sample's MACs (N) of the features, counted as the paper counts.
    """

    stage_channels: Dict[str, int] = {}
    stage_strides: Dict[str, int] = {}

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        """Returns (logits N x classes, macs N): the whole network's MACs, head included."""
        features, macs = self.forward_features(x)
        last = features[next(reversed(features))]
        return self.forward_head(features), macs + self.head_macs(last.size(2), last.size(3))

    def forward_features(self, x) -> Tuple["OrderedDict[str, torch.Tensor]", torch.Tensor]:
        raise NotImplementedError  # abstract

    def forward_head(self, features) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def head_macs(self, h: int, w: int) -> int:
        """MACs of the classifier head on a last feature map of h x w."""
        raise NotImplementedError  # abstract

    def complexity(self, h: int, w: int) -> Costs:
        """The whole network's static costs on an ``h x w`` image. This default is a chain's: the stem
        (``stem_macs``), each of ``blocks()``, then the head (override it for other shapes)."""
        if not all(hasattr(self, a) for a in ("stem_macs", "blocks")):
            raise NotImplementedError(f"{type(self).__name__}: implement complexity(h, w), or stem_macs(h, w) and "
                                      "blocks() for a chain of blocks")
        main, h, w = self.stem_macs(h, w)
        total = Costs(main=main)
        for blk in self.blocks():
            c, h, w = blk.costs(h, w)
            total = total + c
        return total + Costs(main=self.head_macs(h, w))

    #: the constructor's arguments other than grouping and attention (None: no dense host)
    build_args = None

    def dense_host(self) -> "Backbone":
        """The host network without gates, with this network's weights (the dense baseline that
        timings compare with): this class built with the ``dense`` grouping and no attention. A gated
        convolution's weights have the dense convolution's shape, so every host weight loads."""
        if self.build_args is None:
            raise ValueError(f"{type(self).__name__} has no dense host (it sets no build_args)")
        from ..attention import no_attention
        from ..grouping import DenseGrouping

        host = type(self)(grouping=DenseGrouping(), attention=no_attention, **self.build_args)
        own = self.state_dict()
        host.load_state_dict({k: v for k, v in own.items() if k in host.state_dict()}, strict=True)
        return host.to(next(self.parameters()).device).train(self.training)

    def static_macs(self, h: int = 224, w: int = 224) -> dict:
        """The reference's ``get_flops()`` numbers (original, possible, main, dgc, gen) in MACs."""
        return self.complexity(h, w).as_dict(self.heads)
