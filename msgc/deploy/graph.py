"""The deployed network of one input size as a graph: ops over feature buffers and index sets.

A deployer (:mod:`.blocks`, :mod:`.backbones`) describes what one sample computes after the stem, once
per input size, by calling the builder methods of :class:`Graph`. Two interpreters run the same graph:
the native program (:mod:`.native.program`, one C call per batch) and PyTorch (:mod:`.reference`, any
device). Neither holds a MAC formula: the graph keeps the paper's bookkeeping as an ordered list of
static numbers and of the source blocks' own ``sample_macs`` functions, evaluated on the open counts
that the interpreters report (see :meth:`Graph.paper_macs`).

Buffers are ``HW x C`` matrices of one sample (channels-last). A buffer may be a column slice of
another (DenseNet's stage buffer: layers read its first columns and write the next ones). What a
buffer holds can depend on the sample: a convolution asked for the channels some head reads may
compute all of them where that is cheaper; consumers read through index sets, which resolve this.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..modeling.macs import MaskStats
from .fold import FoldedGenerators, fold_bn

__all__ = ["Buffer", "IndexSet", "Logits", "ConvWeights", "ConvOp", "GatesOp", "SetsOp", "DepthwiseOp", "AffineOp",
           "PoolOp", "HeadOp", "Graph", "ALL", "UNION", "GROUPS", "NONE", "RELU", "RELU6"]

#: activations fused into an op's stores
NONE, RELU, RELU6 = 0, 1, 2
#: what a convolution computes: all outputs, the union of a set's heads, each group's open channels
ALL, UNION, GROUPS = 0, 1, 2


@dataclass(eq=False)
class Buffer:
    """A feature map of one sample: ``h x w`` pixels of up to ``cols`` channels (or a column slice
    ``col0 .. col0 + cols`` of ``parent``)."""

    h: int
    w: int
    cols: int
    parent: Optional["Buffer"] = None
    col0: int = 0
    id: int = -1


@dataclass(eq=False)
class IndexSet:
    """The index sets of one mask (``heads x channels``) for a sample: each head's open channels, their
    union and, for a one-head mask over ``groups`` groups, each group's open channels. ``masked``:
    False for a set that only carries attention (every channel open)."""

    heads: int
    channels: int
    groups: int = 0
    masked: bool = True
    id: int = -1
    #: the host groups of the convolution that reads it (its entries are then also split by host group)
    host_groups: int = 1


@dataclass(eq=False)
class Logits:
    """``size`` floats of one sample's gate outputs (a generator's ``heads x channels``)."""

    size: int
    offset: int = -1


class ConvWeights:
    """A convolution's folded weights (``out x in x k x k``, BatchNorm folded in) as ``heads`` groups."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], heads: int, where: str = ""):
        self.weight, self.bias = fold_bn(conv.weight, bn)
        self.heads, self.bn, self.where = heads, bn is not None, where
        self.out_channels, self.in_channels = self.weight.size(0), self.weight.size(1)
        self.kernel, self.stride, self.padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        if self.out_channels % heads:
            raise ValueError(f"deploy: {where}: {heads} heads do not divide {self.out_channels} outputs")
        self.per_head = self.out_channels // heads
        self._layouts = {}

    def layout(self, name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The weights in a kernel's layout, made by ``make`` once (per layout name)."""
        if name not in self._layouts:
            self._layouts[name] = make(self.weight)
        return self._layouts[name]

    def to(self, device):
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        self._layouts = {}
        return self


@dataclass(eq=False)
class GatesOp:
    src: Buffer
    generators: FoldedGenerators
    outputs: List[Logits]
    logits: Logits  # all outputs, consecutive


@dataclass(eq=False)
class SetsOp:
    set: IndexSet
    logits: Optional[Logits] = None
    const: Optional[torch.Tensor] = None  # a static mask as logits (+1 open, -1 closed)
    att: Optional[Logits] = None


@dataclass(eq=False)
class ConvOp:
    src: Buffer
    dst: Buffer
    weights: ConvWeights
    h: int
    w: int
    in_set: Optional[IndexSet] = None
    att: bool = False
    out_mode: int = ALL
    out_set: Optional[IndexSet] = None
    act: int = NONE
    res: Optional[Buffer] = None
    all_rule: bool = False
    #: the convolution's own groups: its weights' heads are host groups x the set's heads
    host_groups: int = 1
    #: the native kernel (0 wide, 1 pixel, 2 gather) and tile family, chosen when the plan is made
    kernel: int = 0
    tiles: int = 0

    @property
    def out_hw(self) -> Tuple[int, int]:
        k, s, p = self.weights.kernel, self.weights.stride, self.weights.padding
        return (self.h + 2 * p - k) // s + 1, (self.w + 2 * p - k) // s + 1


@dataclass(eq=False)
class DepthwiseOp:
    src: Buffer
    dst: Buffer
    weights: ConvWeights
    h: int
    w: int
    set: Optional[IndexSet] = None
    act: int = NONE


@dataclass(eq=False)
class AffineOp:
    src: Buffer
    dst: Buffer
    scale: torch.Tensor
    shift: torch.Tensor
    act: int = NONE
    macs: int = 0  # executed MACs per element


@dataclass(eq=False)
class PoolOp:
    src: Buffer
    dst: Buffer
    k: int
    stride: int
    padding: int
    kind: str = "avg"  # or "max"
    macs: int = 4  # executed MACs per output element, as the paper counts the op


@dataclass(eq=False)
class HeadOp:
    """The classifier: global average pooling of ``src``, then ``weight`` (classes x C) and ``bias``."""

    src: Buffer
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class _BlockMacs:
    fn: Callable
    h: int
    w: int
    sets: Sequence[Optional[IndexSet]]


class Graph:
    """What one sample computes, from its image (the input buffer, ``h x w x 3``) to its logits, for one
    input size, with the paper's MAC bookkeeping."""

    def __init__(self, h: int, w: int, channels: int):
        self.input = Buffer(h, w, channels, id=0)
        self.buffers: List[Buffer] = [self.input]
        self.sets: List[IndexSet] = []
        self.ops: list = []
        self.logits_size = 0
        self.features: Optional[Buffer] = None  # the buffer the classifier reads
        self.classes = 0
        self._macs: List = []
        #: where the ops come from (set by the deployers: the block's name), one per op
        self.scope = ""
        self.scopes: List[str] = []

    def _add(self, op) -> None:
        self.ops.append(op)
        self.scopes.append(self.scope)

    # ---- buffers and sets ------------------------------------------------------------------------

    def buffer(self, h: int, w: int, cols: int) -> Buffer:
        b = Buffer(h, w, cols, id=len(self.buffers))
        self.buffers.append(b)
        return b

    def view(self, parent: Buffer, col0: int, cols: int) -> Buffer:
        """Columns ``col0 .. col0 + cols`` of ``parent``."""
        if col0 + cols > parent.cols:
            raise ValueError(f"deploy: a view of columns {col0}..{col0 + cols} of a {parent.cols}-column buffer")
        b = Buffer(parent.h, parent.w, cols, parent, col0, id=len(self.buffers))
        self.buffers.append(b)
        return b

    def gates(self, src: Buffer, generators: FoldedGenerators) -> List[Logits]:
        """The generators' logits on the context of ``src`` (the mean of its pixels)."""
        if src.cols != generators.in_channels:
            raise ValueError(f"deploy: generators over {generators.in_channels} channels read a {src.cols}-column map")
        outs, start = [], self.logits_size
        for heads, channels in generators.shapes:
            outs.append(Logits(heads * channels, self.logits_size))
            self.logits_size += heads * channels
        everything = Logits(self.logits_size - start, start)
        self._add(GatesOp(src, generators, outs, everything))
        return outs

    def index_set(self, heads: int, channels: int, logits: Optional[Logits] = None,
                  const: Optional[torch.Tensor] = None, att: Optional[Logits] = None,
                  groups: int = 0, host_groups: int = 1) -> Optional[IndexSet]:
        """The index sets of a mask given by ``logits`` (or the static ``const``), with attention
        ``att``; None where there is neither a mask nor attention (every channel, unscaled) and no host
        groups to split by."""
        if logits is None and const is None and att is None and host_groups == 1:
            return None
        s = IndexSet(heads, channels, groups, logits is not None or const is not None, id=len(self.sets),
                     host_groups=host_groups)
        self.sets.append(s)
        self._add(SetsOp(s, logits, const, att))
        return s

    # ---- ops -----------------------------------------------------------------------------------

    def conv(self, src: Buffer, weights: ConvWeights, in_set: Optional[IndexSet] = None, att: bool = False,
             outputs: Tuple[int, Optional[IndexSet]] = (ALL, None), act: int = NONE, res: Optional[Buffer] = None,
             dst: Optional[Buffer] = None, host_groups: int = 1) -> Buffer:
        """A (gated) convolution of ``src``: its heads read ``in_set``'s channels (None: all; ``att``:
        scaled by the set's attention); it computes ``outputs``: ``(ALL, None)``, ``(UNION, s)`` (the
        channels some head of ``s`` reads; one-head convolutions) or ``(GROUPS, s)`` (each head the open
        channels of its group of the one-head set ``s``); ``res`` is added before ``act``."""
        mode, out_set = outputs
        if mode != ALL and out_set is None:
            mode = ALL
        if in_set is not None and in_set.channels != weights.in_channels * host_groups:
            raise ValueError(f"deploy: {weights.where}: a set over {in_set.channels} channels for "
                             f"{weights.in_channels * host_groups} inputs")
        if in_set is not None and in_set.host_groups != host_groups:
            raise ValueError(f"deploy: {weights.where}: a set split by {in_set.host_groups} host groups for a "
                             f"convolution of {host_groups}")
        op = ConvOp(src, None, weights, src.h, src.w, in_set, att, mode, out_set, act, res,
                    all_rule=weights.heads == 1 and mode == UNION, host_groups=host_groups)
        ho, wo = op.out_hw
        op.dst = dst if dst is not None else self.buffer(ho, wo, weights.out_channels)
        self._add(op)
        return op.dst

    def depthwise(self, src: Buffer, weights: ConvWeights, channels: Optional[IndexSet] = None,
                  act: int = NONE) -> Buffer:
        """A depthwise convolution of ``src``'s channels, or only of the union of ``channels``."""
        ho = (src.h + 2 * weights.padding - weights.kernel) // weights.stride + 1
        wo = (src.w + 2 * weights.padding - weights.kernel) // weights.stride + 1
        dst = self.buffer(ho, wo, weights.out_channels)
        self._add(DepthwiseOp(src, dst, weights, src.h, src.w, channels, act))
        return dst

    def affine(self, src: Buffer, bn: nn.BatchNorm2d, act: int = NONE, macs: int = 0) -> Buffer:
        """``act(BatchNorm(src))`` per channel (a pre-activation); ``macs`` executed per element."""
        from .fold import bn_affine

        scale, shift = bn_affine(bn)
        dst = self.buffer(src.h, src.w, src.cols)
        self._add(AffineOp(src, dst, scale.contiguous(), shift.contiguous(), act, macs))
        return dst

    def pool(self, src: Buffer, k: int, dst: Optional[Buffer] = None, kind: str = "avg", stride: Optional[int] = None,
             padding: int = 0, macs: int = 4) -> Buffer:
        """``k x k`` average or max pooling (stride ``k`` unless given); ``macs``: executed MACs per
        output element, as the paper counts the op."""
        stride = k if stride is None else stride
        ho, wo = (src.h + 2 * padding - k) // stride + 1, (src.w + 2 * padding - k) // stride + 1
        dst = dst if dst is not None else self.buffer(ho, wo, src.cols)
        self._add(PoolOp(src, dst, k, stride, padding, kind, macs))
        return dst

    def head(self, src: Buffer, fc: nn.Linear) -> None:
        """The classifier on the mean of ``src`` over its pixels: the sample's logits."""
        self.features = src
        self.classes = fc.out_features
        self._add(HeadOp(src, fc.weight.detach().float().contiguous(), fc.bias.detach().float().contiguous()))

    # ---- the paper's MACs -------------------------------------------------------------------------

    def add_macs(self, value) -> None:
        """A fixed number of MACs (a stem, a transition, a head), in forward order."""
        self._macs.append(value)

    def add_block_macs(self, fn: Callable, h: int, w: int, sets: Sequence[Optional[IndexSet]]) -> None:
        """A gated block's count: ``fn(h, w, *stats)`` with the :class:`MaskStats` of ``sets``."""
        self._macs.append(_BlockMacs(fn, h, w, list(sets)))

    def stats_layout(self) -> List[Tuple[IndexSet, int]]:
        """Where each masked set's counts lie in a sample's stats (counts per head, union, per group)."""
        out, offset = [], 0
        for s in self.sets:
            if s.masked:
                out.append((s, offset))
                offset += s.heads + 1 + s.groups
        return out

    def paper_macs(self, stats: Sequence[int]) -> float:
        """One sample's MACs as the eval model counts them, from its stats (see :meth:`stats_layout`),
        with the same float64 operations in the same order."""
        where = {s: off for s, off in self.stats_layout()}
        total = None
        for entry in self._macs:
            if isinstance(entry, _BlockMacs):
                masks = []
                for s in entry.sets:
                    if s is None or not s.masked:
                        masks.append(MaskStats.none())
                    else:
                        o = where[s]
                        masks.append(MaskStats.from_counts(stats[o:o + s.heads], stats[o + s.heads], s.channels,
                                                           stats[o + s.heads + 1:o + s.heads + 1 + s.groups]))
                value = entry.fn(entry.h, entry.w, *masks)
            else:
                value = entry
            total = float(value) if total is None else total + value
        return total
