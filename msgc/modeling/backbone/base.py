"""The interface every backbone implements, and helpers shared by the gated blocks."""
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import nn

from ..layers import Generator
from ..macs import Costs

__all__ = ["Backbone", "GatedBlock"]


class GatedBlock(nn.Module):
    """A block whose gated convolutions are decided from the pooled block input (its context).

    Subclasses implement ``block_costs(h, w) -> (terms: dict, h_out, w_out)``, where ``terms`` holds
    ``main``, ``gen``, ``extra`` and the full cost of every gated convolution, and
    ``sample_macs(h, w, *masks)``: the per-sample count from the :class:`~msgc.modeling.macs.MaskStats`
    of the block's masks, which both its ``forward`` and the deployed network call. The cached terms
    serve the static count (:meth:`costs`) and ``sample_macs``.
    """

    def _finish(self, generators):
        self.uses_context = any(isinstance(g, Generator) for g in generators)
        self._terms_cache = {}

    def terms(self, h: int, w: int):
        key = (h, w)
        if key not in self._terms_cache:
            self._terms_cache[key] = self.block_costs(h, w)
        return self._terms_cache[key]

    def costs(self, h: int, w: int) -> Tuple[Costs, int, int]:
        t, ho, wo = self.terms(h, w)
        dgc = sum(v for k, v in t.items() if k.startswith("dgc"))
        return Costs(main=t["main"], dgc=dgc, gen=t["gen"], extra=t["extra"]), ho, wo

    def pool_cost(self, h, w, channels):
        """The context's average pooling, counted when a generator reads it."""
        return h * w * channels if self.uses_context else 0

    def context(self, x):
        return x.mean((2, 3), keepdim=True) if self.uses_context else x[:, :, :1, :1]


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
        raise NotImplementedError  # abstract

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
