"""The interface every backbone implements, and helpers shared by the gated blocks."""
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from torch import nn

from ..layers import _Generator
from ..macs import Costs

__all__ = ["Backbone", "GatedBlock", "mask_mean", "unread_fraction"]


def mask_mean(mask, n: int, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of a mask ``N x heads x C`` in float64 (None: all open -> ones)."""
    if mask is None:
        return ref.new_ones(n, dtype=torch.float64)
    return mask.flatten(1).double().mean(1)


def unread_fraction(mask, n: int, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of channels that no head reads (detached; None -> zeros)."""
    if mask is None:
        return ref.new_zeros(n, dtype=torch.float64)
    return (1.0 - mask.detach().double()).prod(1).mean(1)


class GatedBlock(nn.Module):
    """A block whose gated convolutions are decided from the pooled block input (its context).

    Subclasses implement ``block_costs(h, w) -> (terms: dict, h_out, w_out)``, where ``terms`` holds
    ``main``, ``gen``, ``extra`` and the full cost of every gated convolution; the cached result serves
    both the static count (:meth:`costs`) and the per-sample count in ``forward``.
    """

    def _finish(self, generators):
        self.uses_context = any(isinstance(g, _Generator) for g in generators)
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

    def static_macs(self, h: int = 224, w: int = 224) -> dict:
        """The reference's ``get_flops()`` numbers (original, possible, main, dgc, gen) in MACs."""
        return self.complexity(h, w).as_dict(self.heads)
