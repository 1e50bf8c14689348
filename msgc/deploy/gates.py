"""A block's gates for one sample, turned into the index sets the deployed kernels run on."""
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..modeling.grouping import StaticMask
from ..modeling.layers import AttentionGenerator, MaskGenerator
from .ops import Generators

__all__ = ["BlockGates", "HeadSets"]


class HeadSets:
    """The open channels of a ``heads x C`` boolean mask, per head and together (index work in numpy:
    these arrays are small and numpy's per-call cost is a fraction of torch's). Index tensors are
    int32, as the native kernels read them.

    Attributes:
        idx: per head, its open channels (None: all C of them).
        union: channels that some head reads (None: all).
        pos: per head, its channels numbered within ``union`` (the columns of a tensor that holds
            only the union's channels; None: all, in order).
        open: per head, the number of open channels (None: no mask, all open).
        mean: the mask's mean (the paper's fraction of the gated work done); 1.0 without a mask.
        unread: the fraction of channels that no head reads; 0.0 without a mask.
    """

    def __init__(self, mask: Optional[torch.Tensor], heads: int, channels: int):
        self.heads, self.channels = heads, channels
        if mask is None:
            self.idx, self.union, self.pos, self.open = [None] * heads, None, [None] * heads, None
            self.mean, self.unread, self._cols, self._m = 1.0, 0.0, None, None
            return
        m = self._m = mask.numpy()
        self.open = m.sum(1).tolist()
        rows, cols = np.nonzero(m)
        self._cols = cols
        self.mean = sum(self.open) / (heads * channels)
        self.idx = self._split(cols)
        if heads == 1:
            self.union, self.pos = self.idx[0], [None]
            self.unread = (channels - self.open[0]) / channels
            return
        read = m.any(0)
        n_read = int(read.sum())
        self.unread = (channels - n_read) / channels
        if n_read == channels:
            self.union, self.pos = None, self.idx
        else:
            self.union = torch.from_numpy(np.flatnonzero(read).astype(np.int32))
            self.pos = self._split((np.cumsum(read) - 1)[cols])

    def _split(self, values) -> List[Optional[torch.Tensor]]:
        t, out, start = torch.from_numpy(values.astype(np.int32)), [], 0
        for k in self.open:
            out.append(None if k == self.channels else t[start:start + k])
            start += k
        return out

    def reading(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Per head, the columns of ``x`` it reads: ``pos`` if x holds only the union's channels, else
        ``idx`` (x holds all channels: a producer may compute unread channels where that is cheaper)."""
        return self.idx if x.size(1) == self.channels else self.pos

    def scales(self, att: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Per head, the attention of its open channels (att: heads x C, or None)."""
        if att is None:
            return [None] * self.heads
        if self._cols is None:
            return list(att)
        flat = self._cols + np.repeat(np.arange(self.heads) * self.channels, self.open)
        values, out, start = att.reshape(-1).index_select(0, torch.from_numpy(flat)), [], 0
        for i, k in enumerate(self.open):
            out.append(att[i] if k == self.channels else values[start:start + k])
            start += k
        return out

    def rows_per_head(self, heads: int) -> List[Optional[torch.Tensor]]:
        """For a one-head mask over the outputs of a ``heads``-group convolution: each group's open
        outputs, numbered within the group (None: all open)."""
        if self._m is None:
            return [None] * heads
        return HeadSets(torch.from_numpy(self._m[0].reshape(heads, -1)), heads, self.channels // heads).idx

    def open_per_group(self, heads: int) -> List[int]:
        """For a one-head mask: the number of open channels in each of ``heads`` equal groups."""
        return self._m[0].reshape(heads, -1).sum(1).tolist()



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
