"""A block's gates for one sample, turned into the index sets the deployed kernels run on."""
from typing import Dict, List, Optional

import torch
from torch import nn

from ..modeling.grouping import StaticMask
from ..modeling.layers import AttentionGenerator, MaskGenerator
from .ops import Generators

__all__ = ["BlockGates", "HeadSets"]


class HeadSets:
    """The open channels of a ``heads x C`` mask, per head and together.

    Attributes:
        mask: the float mask ``1 x heads x C`` (None: every channel open), for the paper's MAC count.
        idx: per head, its open channels (None: all C of them).
        union: channels that some head reads (None: all).
        pos: per head, its channels numbered within ``union`` (the columns of a tensor that holds
            only the union's channels; None: all, in order).
    """

    def __init__(self, mask: Optional[torch.Tensor], heads: int, channels: int):
        self.heads, self.channels = heads, channels
        if mask is None:
            self.mask, self.idx, self.union, self.pos, self.counts = None, [None] * heads, None, [None] * heads, None
            return
        self.mask = mask.unsqueeze(0).float()
        self.counts = mask.sum(1).tolist()
        cols = mask.nonzero()[:, 1]
        self.idx = [None if k == channels else t for k, t in zip(self.counts, torch.split(cols, self.counts))]
        if heads == 1:
            self.union, self.pos = self.idx[0], [None]
            return
        union = mask.any(0)
        self.union = union.nonzero()[:, 0]
        if self.union.numel() == channels:
            self.union, self.pos = None, self.idx
        else:
            number = union.cumsum(0) - 1
            self.pos = [number if i is None else number.index_select(0, i) for i in self.idx]

    def scales(self, att: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Per head, the attention of its open channels (att: heads x C, or None)."""
        if att is None:
            return [None] * self.heads
        return [a if i is None else a.index_select(0, i) for a, i in zip(att, self.idx)]

    def rows_per_head(self, heads: int) -> List[Optional[torch.Tensor]]:
        """For a one-head mask over the outputs of a ``heads``-group convolution: each group's open
        outputs, numbered within the group (None: all open)."""
        if self.mask is None:
            return [None] * heads
        per = self.channels // heads
        local = self.mask.view(heads, per) > 0
        counts = local.sum(1).tolist()
        cols = local.nonzero()[:, 1]
        return [None if k == per else t for k, t in zip(counts, torch.split(cols, counts))]


_MASKS = (MaskGenerator, StaticMask)


class BlockGates(nn.Module):
    """The mask and attention generators of one block, run together on its context.

    ``sources`` maps a name (``maskgen1``, ``attgen2``, ...) to the block's module of that name (or
    None). Mask generators and attention generators share one stacked first layer
    (:class:`Generators`); static masks are constants.
    """

    def __init__(self, sources: Dict[str, Optional[nn.Module]], where: str):
        super().__init__()
        generators, self.order, self.static = [], [], {}
        for name, module in sources.items():
            if module is None:
                continue
            if isinstance(module, StaticMask):
                self.static[name] = module.mask.detach().bool().clone()
            elif isinstance(module, (MaskGenerator, AttentionGenerator)):
                generators.append(module)
                self.order.append((name, isinstance(module, MaskGenerator)))
            else:
                raise ValueError(
                    f"deploy: {where}.{name} is a {type(module).__name__}; deploy supports MaskGenerator, "
                    "StaticMask and AttentionGenerator (groupings msgc, prune, static, dense; attention none, "
                    "channel)")
        self.generators = Generators(generators)
        self.names = set(sources)

    @property
    def macs(self) -> int:
        return self.generators.macs

    def forward(self, context: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """-> name: boolean mask (heads x C) for mask generators and static masks, logits for attention."""
        out = dict(self.static)
        if self.order:
            for (name, is_mask), logits in zip(self.order, self.generators(context)):
                out[name] = logits >= 0 if is_mask else logits
        return out
