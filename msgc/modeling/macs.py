"""MAC accounting exactly as the reference's ``get_flops()`` counts it.

Every gated block reports :class:`Costs` for an input size, split as the reference splits them:

- ``main``: work that no gate touches (stem, downsampling, MobileNetV2's expansions, the head, ...);
- ``dgc``: the gated convolutions at full width (including the attention multiplications);
- ``gen``: the gate and attention generators and the pooling of their context;
- ``extra``: the attention multiplications, which the dense host does not have.

The dense host costs ``main + dgc - extra``; the lowest reachable cost is ``main + dgc / heads + gen``.
A sample's dynamic MACs are ``main + sum(gated layer MACs x that sample's mean gate) + gen - bonus``,
where the bonus is the work on channels that no head reads (computed by each block in its forward).
"""
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

__all__ = ["Costs", "MaskStats", "conv_out", "detached", "heads_dot", "row_sum"]


def conv_out(size: int, kernel: int, padding: int = 0, stride: int = 1) -> int:
    """Output side of a convolution or pooling (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass
class Costs:
    """Static MACs per sample of a module, split as the reference splits them."""

    main: int = 0
    dgc: int = 0
    gen: int = 0
    extra: int = 0

    def __add__(self, other: "Costs") -> "Costs":
        return Costs(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def original(self) -> int:
        """The dense host's MACs."""
        return self.main + self.dgc - self.extra

    def possible(self, heads: int) -> float:
        """The lowest reachable MACs: every head reads 1/heads of the gated work."""
        return self.main + self.dgc / heads + self.gen

    def as_dict(self, heads: int) -> dict:
        return {"original": self.original, "possible": self.possible(heads), "main": self.main,
                "dgc": self.dgc, "gen": self.gen}


# ---- per-sample counts ---------------------------------------------------------------------------
#
# A gated block's MACs for a sample depend on its masks only through a few statistics: the fraction of
# open gates, the fraction of channels that no head reads, and (ResNet bottlenecks) each head's open
# fraction and each group's unread fraction. Each block's ``sample_macs(h, w, *masks)`` is written once
# against :class:`MaskStats`, and runs on float64 tensors (the model's forward, from the mask tensors)
# and on Python floats (the deployed network, from the open counts its kernels report), with the same
# float64 operations in the same order: the two counts are identical, bit for bit.


class MaskStats:
    """What the paper's MAC count needs of one mask (``N x heads x C``, or None: every channel open).

    Attributes:
        mean: per sample, the fraction of open gates (float64 ``N`` tensor, or a float).
        unread: per sample, the fraction of channels that no head reads.
        heads: the mask's number of heads.
    """

    mean = 1.0
    unread = 0.0
    heads = 1

    def head_open(self):
        """Per sample and head, the fraction of the head's channels open (None: no mask)."""
        return None

    def group_unread(self, groups: int, host_groups: int = 1):
        """For a one-head mask over the outputs of a convolution with ``groups`` heads: per sample and
        head, the fraction of the head's channels closed (None: no mask). With ``host_groups``, the
        outputs are laid out host group by host group, each split among the heads (a ResNeXt's 3x3):
        a head's channels are its share of every host group."""
        return None

    @staticmethod
    def of(mask, n: int, ref: torch.Tensor) -> "MaskStats":
        """The statistics of a mask tensor of a batch of ``n`` (``ref``: any tensor on its device)."""
        return _NoMask(n, ref) if mask is None else _TensorMask(mask)

    @staticmethod
    def from_counts(open_counts: Sequence[int], union: int, channels: int,
                    group_counts: Optional[Sequence[int]] = None) -> "MaskStats":
        """The statistics of one sample's mask from its counts: open channels per head, the number of
        channels some head reads, and (one-head masks over groups) the open channels per group."""
        return _CountMask(open_counts, union, channels, group_counts)

    @staticmethod
    def none() -> "MaskStats":
        """No mask, for one sample (Python floats)."""
        return MaskStats()


class _NoMask(MaskStats):
    def __init__(self, n, ref):
        self.mean = ref.new_ones(n, dtype=torch.float64)
        self.unread = ref.new_zeros(n, dtype=torch.float64)


class _TensorMask(MaskStats):
    def __init__(self, mask: torch.Tensor):
        self.mask, self.heads = mask, mask.size(1)
        self.mean = mask.flatten(1).double().mean(1)
        self.unread = (1.0 - mask.detach().double()).prod(1).mean(1)

    def head_open(self):
        return self.mask.detach().double().mean(2)

    def group_unread(self, groups, host_groups=1):
        m = self.mask.detach()[:, 0].double()
        if host_groups == 1:
            return (1.0 - m).view(m.size(0), groups, -1).mean(2)
        return (1.0 - m).view(m.size(0), host_groups, groups, -1).mean((1, 3))


class _CountMask(MaskStats):
    def __init__(self, open_counts, union, channels, group_counts):
        self.counts, self.channels, self.groups = list(open_counts), channels, group_counts
        self.heads = len(self.counts)
        self.mean = sum(self.counts) / (self.heads * channels)
        self.unread = (channels - union) / channels

    def head_open(self):
        return [k / self.channels for k in self.counts]

    def group_unread(self, groups, host_groups=1):
        per = self.channels // groups
        if host_groups == 1:
            return [(per - k) / per for k in self.groups]
        # the counts come per host group and head (host group major): a head's are every host group's
        opened = [sum(self.groups[g * groups + h] for g in range(host_groups)) for h in range(groups)]
        return [(per - k) / per for k in opened]


def heads_dot(a, b):
    """``sum_i a[i] * b[i]`` over heads (the last dim of ``N x heads`` tensors, or two lists), in the
    order torch sums a float64 row."""
    if isinstance(a, torch.Tensor):
        return (a * b).sum(1)
    return row_sum([x * y for x, y in zip(a, b)])


def row_sum(values: Sequence[float]) -> float:
    """Sum as torch sums one row of a float64 matrix: left to right up to four terms (tested), torch
    itself beyond."""
    if len(values) <= 4:
        total = 0.0
        for v in values:
            total += v
        return total
    return torch.tensor([list(values)], dtype=torch.float64).sum(1).item()


def detached(value):
    """``value`` without its gradient (the bonus of unread channels is not trained through)."""
    return value.detach() if isinstance(value, torch.Tensor) else value
