"""A block's gates for one sample, turned into the index sets the deployed kernels run on."""
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..modeling.grouping import StaticMask
from ..modeling.layers import AttentionGenerator, MaskGenerator
from . import native as native_kernels
from .ops import Generators, Split

__all__ = ["BlockGates", "HeadSets"]


class HeadSets:
    """The open channels of a ``heads x C`` gate matrix (a channel is open where its logit is >= 0), per
    head and together, and the attention of the open channels. Index tensors are int32, as the native
    kernels read them. With ``native`` the sets come from :func:`native.head_sets` (one C call), else
    from numpy (small arrays: numpy's per-call cost is a fraction of torch's).

    Attributes:
        idx: per head, its open channels (None: all C of them).
        union: channels that some head reads (None: all).
        pos: per head, its channels numbered within ``union`` (the columns of a tensor that holds
            only the union's channels; None: all, in order).
        scale: per head, the attention of its open channels (None: no attention).
        open: per head, the number of open channels (None: no mask, all open).
        mean: the mask's mean (the paper's fraction of the gated work done); 1.0 without a mask.
        unread: the fraction of channels that no head reads; 0.0 without a mask.
    """

    def __init__(self, logits: Optional[torch.Tensor], heads: int, channels: int,
                 att: Optional[torch.Tensor] = None, native: bool = False):
        self.heads, self.channels, self.native, self._logits, self._groups = heads, channels, native, logits, {}
        if logits is None:
            self.idx, self.union, self.pos, self.open = [None] * heads, None, [None] * heads, None
            self.scale = [None] * heads if att is None else list(att)
            self.mean, self.unread = 1.0, 0.0
            return
        self._counts = None
        if native:
            self.open, self._counts, idx, vals, union, pos = native_kernels.head_sets(logits, att)
        else:
            self.open, idx, vals, union, pos = _head_sets(logits, att)
        self.mean = sum(self.open) / (heads * channels)
        self.idx = self._split(idx)
        self.scale = [None] * heads if vals is None else self._split(vals, keep_full=True)
        if heads == 1:
            self.union, self.pos = self.idx[0], [None]
            self.unread = (channels - self.open[0]) / channels
            return
        self.unread = (channels - union.numel()) / channels
        if union.numel() == channels:
            self.union, self.pos = None, self.idx
        else:
            self.union, self.pos = union, self._split(pos)

    def _split(self, flat: torch.Tensor, keep_full: bool = False) -> List[Optional[torch.Tensor]]:
        """``flat`` (one entry per open channel, head after head) -> one piece per head; a head with
        every channel open gets None unless ``keep_full``. A :class:`Split` on the native path."""
        if self._counts is not None:
            return Split(flat, self._counts[:self.heads], self.open, self.channels, keep_full)
        out, start = [], 0
        for k in self.open:
            out.append(None if k == self.channels and not keep_full else flat[start:start + k])
            start += k
        return out

    def union_rows(self) -> Optional[List[Optional[torch.Tensor]]]:
        """``union`` as the ``rows`` of a one-head convolution that computes the channels some head
        reads (None: all)."""
        if self.union is None:
            return None
        if self._counts is None:
            return [self.union]
        return Split(self.union, self._counts[self.heads:], [self.union.numel()], self.channels, keep_full=True)

    def reading(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Per head, the columns of ``x`` it reads: ``pos`` if x holds only the union's channels, else
        ``idx`` (x holds all channels: a producer may compute unread channels where that is cheaper)."""
        return self.idx if x.size(1) == self.channels else self.pos

    def groups(self, heads: int) -> "HeadSets":
        """For a one-head mask over the outputs of a ``heads``-group convolution: the sets of each
        group, channels numbered within the group (``idx``: each group's open outputs, ``open``: how
        many; all open without a mask)."""
        if heads not in self._groups:
            logits = None if self._logits is None else self._logits.view(heads, -1)
            self._groups[heads] = HeadSets(logits, heads, self.channels // heads, native=self.native)
        return self._groups[heads]


def _head_sets(logits: torch.Tensor, att: Optional[torch.Tensor]):
    """numpy version of :func:`native.head_sets`: ``(counts, idx, vals, union, pos)``."""
    m = (logits >= 0).cpu().numpy()
    device = logits.device
    rows, cols = np.nonzero(m)
    counts = m.sum(1).tolist()
    read = m.any(0)
    where = np.cumsum(read) - 1
    union = torch.from_numpy(np.flatnonzero(read).astype(np.int32)).to(device)
    idx = torch.from_numpy(cols.astype(np.int32)).to(device)
    pos = torch.from_numpy(where[cols].astype(np.int32)).to(device)
    vals = None
    if att is not None:
        vals = att.reshape(-1).index_select(0, torch.from_numpy(rows * m.shape[1] + cols).to(device))
    return counts, idx, vals, union, pos


class BlockGates(nn.Module):
    """The mask and attention generators of one block, run together on its context.

    ``sources`` maps a name (``maskgen1``, ``attgen2``, ...) to the block's module of that name (or
    None). Mask generators and attention generators share one stacked first layer
    (:class:`Generators`); static masks are constants.
    """

    def __init__(self, sources: Dict[str, Optional[nn.Module]], where: str, native: bool = False):
        super().__init__()
        generators, self.order, self.static = [], [], {}
        for name, module in sources.items():
            if module is None:
                continue
            if isinstance(module, StaticMask):  # as logits: 1 where open, -1 where closed
                self.static[name] = module.mask.detach().float() * 2 - 1
            elif isinstance(module, (MaskGenerator, AttentionGenerator)):
                generators.append(module)
                self.order.append(name)
            else:
                raise ValueError(
                    f"deploy: {where}.{name} is a {type(module).__name__}; deploy supports MaskGenerator, "
                    "StaticMask and AttentionGenerator (groupings msgc, prune, static, dense; attention none, "
                    "channel)")
        self.generators = Generators(generators, native)

    @property
    def macs(self) -> int:
        return self.generators.macs

    def forward(self, x: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """x: the block's input, ``HW x C`` (its mean over pixels is the context; None if no generator
        needs it) -> name: ``heads x C`` logits of each generator (a mask opens a channel where its
        logit is >= 0) and each static mask (+-1)."""
        out = dict(self.static)
        if self.order:
            out.update(zip(self.order, self.generators(x)))
        return out
