"""Folding an eval-mode network's parameters into the deployed layers' weights (done once, at deploy)."""
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..modeling.layers import Generator

__all__ = ["bn_affine", "fold_bn", "FoldedGenerators", "to_matrix"]


def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift`` per channel -> (scale, shift), float32."""
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return scale, bn.bias.detach().float() - bn.running_mean.float() * scale


def fold_bn(weight: torch.Tensor, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A convolution weight (out first) and the eval-mode BatchNorm after it -> (weight, bias)."""
    weight = weight.detach().float()
    if bn is None:
        return weight.clone(), None
    scale, bias = bn_affine(bn)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias


class FoldedGenerators:
    """A block's generators evaluated together: their first 1x1 convolutions (BatchNorm folded) stacked
    into one matrix ``w1``/``b1``, their second ones packed into ``w2``/``b2`` with ``desc`` (per
    generator: rows, first hidden unit, hidden units, first output, first weight). ``shapes``: each
    generator's (heads, channels); ``macs``: their MACs as the paper counts them."""

    def __init__(self, generators: List[Generator]):
        firsts, biases, seconds, desc = [], [], [], []
        unit = row = weight = 0
        self.shapes, self.macs = [], 0
        for g in generators:
            w1, b1 = fold_bn(g.first.weight.flatten(1), g.norm)
            firsts.append(w1)
            biases.append(b1)
            w2 = g.second.weight.detach().float().flatten(1).contiguous()
            seconds.append((w2, g.second.bias.detach().float()))
            desc.append([w2.size(0), unit, w2.size(1), row, weight])
            unit, row, weight = unit + w2.size(1), row + w2.size(0), weight + w2.numel()
            self.shapes.append((g.heads, g.channels))
            self.macs += g.macs
        self.in_channels = generators[0].in_channels if generators else 0
        self.w1 = torch.cat(firsts).contiguous() if firsts else None
        self.b1 = torch.cat(biases).contiguous() if firsts else None
        self.w2 = torch.cat([w.view(-1) for w, _ in seconds]) if seconds else None
        self.b2 = torch.cat([b for _, b in seconds]) if seconds else None
        self.desc = torch.tensor(desc, dtype=torch.int64).view(-1, 5)
        self.seconds = seconds

    def __len__(self):
        return len(self.shapes)

    def to(self, device):
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, getattr(self, name).to(device))
        self.seconds = [(w.to(device), b.to(device)) for w, b in self.seconds]
        return self


def to_matrix(x: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` -> ``N x H x W x C``, contiguous (the programs' input layout)."""
    return x.permute(0, 2, 3, 1).contiguous()
