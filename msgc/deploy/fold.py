"""Folding an eval-mode network's parameters into the deployed layers' weights (done once, at deploy)."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..modeling.layers import Generator, MaskGenerator

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
    """Generators evaluated together on one context: their first 1x1 convolutions (BatchNorm folded)
    stacked into one matrix ``w1``/``b1`` (then ReLU), their second ones packed into ``w2``/``b2`` with
    ``desc`` (per generator: rows, first hidden unit, hidden units, first output, first weight, output
    activation: 0 none, 1 sigmoid). ``shapes``: each one's (heads, channels); ``macs``: their MACs as
    the paper counts them. Made with :meth:`of` (a block's mask and attention generators) or
    :meth:`of_squeeze_excitation`.

    The mask generators' output biases hold their gates' thresholds (``bias - threshold``, as at
    deploy); :meth:`set_threshold` rewrites them in place for another threshold (a MAC budget), so that
    a lowered program, which reads these tensors, decides its gates at that threshold."""

    DESC_FIELDS = 6

    def __init__(self, parts: List[Tuple]):
        """``parts``: per generator (w1, b1, w2, b2, heads, channels, macs, activation)."""
        desc, unit, row, weight = [], 0, 0, 0
        self.shapes, self.macs, self.seconds, self.acts = [], 0, [], []
        for w1, b1, w2, b2, heads, channels, macs, act in parts:
            desc.append([w2.size(0), unit, w2.size(1), row, weight, act])
            unit, row, weight = unit + w2.size(1), row + w2.size(0), weight + w2.numel()
            self.shapes.append((heads, channels))
            self.macs += macs
            self.seconds.append((w2, b2))
            self.acts.append(act)
        self.in_channels = parts[0][0].size(1) if parts else 0
        self.w1 = torch.cat([p[0] for p in parts]).contiguous() if parts else None
        self.b1 = torch.cat([p[1] for p in parts]).contiguous() if parts else None
        self.w2 = torch.cat([w.view(-1) for w, _ in self.seconds]) if parts else None
        self.b2 = torch.cat([b for _, b in self.seconds]) if parts else None
        self.desc = torch.tensor(desc, dtype=torch.int64).view(-1, self.DESC_FIELDS)
        #: per mask generator: (its index, its bias without threshold, its gate's threshold at deploy)
        self.gated: List[Tuple[int, torch.Tensor, float]] = []
        #: per mask generator with a budget input (by index): (its first layer's bias without the budget,
        #: its budget weights of the hidden units and of the logits, the budget's code at deploy)
        self.budgeted: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    @classmethod
    def of(cls, generators: List[Generator]) -> "FoldedGenerators":
        parts, budgeted = [], {}
        for i, g in enumerate(generators):
            w1, b1 = fold_bn(g.first.weight.flatten(1), g.norm)
            w2 = g.second.weight.detach().float().flatten(1).contiguous()
            bias = g.output_bias() if isinstance(g, MaskGenerator) else g.second.bias.detach()
            if isinstance(g, MaskGenerator) and g.budget_range is not None:  # the budget input, folded
                code = _deploy_code(g)
                hidden, logits = g.budget_hidden.detach().float(), g.budget_logits.detach().float()
                budgeted[i] = (b1.clone(), hidden, logits, code)
                b1, bias = b1 + code * hidden, bias.float() + code * logits
            parts.append((w1, b1, w2, bias.float().clone(), g.heads, g.channels, g.macs, 0))  # never the model's
        folded = cls(parts)
        folded.gated = [(i, g.second.bias.detach().float().clone(), float(g.gate.threshold))
                        for i, g in enumerate(generators) if isinstance(g, MaskGenerator)]
        folded.budgeted = budgeted
        return folded

    def set_threshold(self, threshold: Optional[float], code: Optional[float] = None) -> None:
        """Every mask generator's gates open at ``threshold`` (None: at the thresholds of deploy time),
        and generators with a budget input decide for the normalised budget ``code``
        (:meth:`msgc.modeling.layers.MaskGenerator.budget_code`; None: the budget of deploy time), by
        rewriting the biases in place (``bias - threshold + code x budget_logits`` and the first
        layer's ``bias + code x budget_hidden``, as the eval model adds them)."""
        for i, raw, at_deploy in self.gated:
            value = raw - (at_deploy if threshold is None else threshold)
            if i in self.budgeted:
                _, _, logits, deploy_code = self.budgeted[i]
                value = value + (deploy_code if code is None else code) * logits
            row, rows = int(self.desc[i, 3]), int(self.desc[i, 0])
            self.b2[row:row + rows].copy_(value)
            self.seconds[i][1].copy_(value)
        for i, (b1, hidden, _, deploy_code) in self.budgeted.items():
            unit = int(self.desc[i, 1])
            self.b1[unit:unit + b1.numel()].copy_(b1 + (deploy_code if code is None else code) * hidden)

    @classmethod
    def of_squeeze_excitation(cls, se: nn.Module, where: str = "") -> "FoldedGenerators":
        """torchvision's ``SqueezeExcitation`` (ReLU, then sigmoid) as one generator of one head."""
        if not (isinstance(se.activation, nn.ReLU) and isinstance(se.scale_activation, nn.Sigmoid)):
            raise ValueError(f"deploy: {where}: a squeeze-excitation deploys with ReLU and sigmoid, got "
                             f"{type(se.activation).__name__} and {type(se.scale_activation).__name__}")
        f1, f2 = se.fc1, se.fc2
        w1, b1 = f1.weight.detach().float().flatten(1).contiguous(), f1.bias.detach().float().clone()
        w2, b2 = f2.weight.detach().float().flatten(1).contiguous(), f2.bias.detach().float().clone()
        return cls([(w1, b1, w2, b2, 1, f2.out_channels, w1.numel() + w2.numel(), 1)])

    def __len__(self):
        return len(self.shapes)

    def to(self, device):
        for name in ("w1", "b1", "w2", "b2"):
            setattr(self, name, getattr(self, name).to(device))
        self.seconds = [(w.to(device), b.to(device)) for w, b in self.seconds]
        self.gated = [(i, raw.to(device), at) for i, raw, at in self.gated]
        self.budgeted = {i: (b.to(device), h.to(device), lg.to(device), c)
                         for i, (b, h, lg, c) in self.budgeted.items()}
        return self


def _deploy_code(g: MaskGenerator) -> float:
    """The normalised budget a budget-input generator decides for at deploy (one for every image)."""
    if isinstance(g.budget, torch.Tensor):
        raise ValueError("deploy: the model has a budget per image; set one budget for every image (or None) before "
                         "deploy, and choose per image with deployed(images, budget=[...])")
    return float(g.budget_code())


def to_matrix(x: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` -> ``N x H x W x C``, contiguous (the programs' input layout)."""
    return x.permute(0, 2, 3, 1).contiguous()
