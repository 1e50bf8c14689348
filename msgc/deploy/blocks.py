"""Deployed versions of the gated blocks: per sample, only what the gates keep is computed.

Each deployed block maps ``(x, h, w, macs, executed)`` to the same for its output, where ``x`` is the
``HW x C`` channels-last matrix of one sample, ``macs`` the paper-counted MACs so far and ``executed``
the MACs actually run so far (an int).

``macs`` is a Python float updated with the same float64 operations, in the same order, as the source
block's forward (from the source block's cached cost terms and the masks' counts), so that it equals the
eval model's ``macs`` bit for bit; the tests hold the two against each other. Doing it in Python
rather than on one-element tensors saves some 60 microseconds per block.
"""
import torch
from torch import nn

from .gates import BlockGates, HeadSets
from .ops import RELU, RELU6, DepthwiseConv, FoldedConv, HeadConv, PointHeadConv, PreActivation

__all__ = ["DeployedBlock", "DeployedBasicBlock", "DeployedBottleneck", "DeployedInvertedResidual",
           "DeployedDenseLayer"]


class DeployedBlock(nn.Module):
    """Shared part: the context, the gates and the paper's MAC count of the source block."""

    def __init__(self, block, gate_names, where, native):
        super().__init__()
        self.gates = BlockGates({n: getattr(block, n) for n in gate_names}, where, native)
        self.uses_context = block.uses_context
        self.native = native
        self.terms = block.terms  # the source block's cached cost terms (a bound method, not a submodule)

    def decide(self, x):
        """The gates' logits for sample x (HW x C) and the MACs of computing them."""
        if not self.uses_context:
            return self.gates(None), 0
        return self.gates(x), x.numel() + self.gates.macs

    def sets(self, g, mask, att, heads, channels):
        """:class:`HeadSets` of the gate ``mask`` (a name in ``g``), with the attention ``att``."""
        return HeadSets(g.get(mask), heads, channels, g.get(att), self.native)


class DeployedBasicBlock(DeployedBlock):
    """ResNet basic block: conv1 reads the open inputs and computes only the channels that some head of
    conv2 reads; each head of conv2 reads its open channels; attention folded in."""

    def __init__(self, block, where="", native=False):
        super().__init__(block, ("maskgen1", "maskgen2", "attgen1", "attgen2"), where, native)
        self.heads, self.planes = block.heads, block.planes
        self.conv1 = HeadConv(block.conv1, block.bn1, 1, native)
        self.conv2 = HeadConv(block.conv2, block.bn2, block.heads, native)
        self.downsample = None if block.downsample is None else FoldedConv(*block.downsample, native=native)

    def forward(self, x, h, w, macs, executed):
        g, ex = self.decide(x)
        s1 = self.sets(g, "maskgen1", "attgen1", 1, x.size(1))
        s2 = self.sets(g, "maskgen2", "attgen2", self.heads, self.planes)
        rows = s2.union_rows()
        y, ho, wo, m1 = self.conv1(x, h, w, s1.idx, s1.idx, s1.scale, rows, RELU)
        identity, m3 = x, 0
        if self.downsample is not None:
            identity, _, _, m3 = self.downsample(x, h, w)
        out, _, _, m2 = self.conv2(y, ho, wo, s2.reading(y), s2.idx, s2.scale, None, RELU, identity)
        return out, ho, wo, _two_conv_macs(macs, self.terms(h, w)[0], s1, s2), executed + ex + m1 + m2 + m3


class DeployedBottleneck(DeployedBlock):
    """ResNet bottleneck: conv1 (open inputs -> channels some head reads), conv2 per head (only the
    outputs that conv3's mask keeps: the second bonus), conv3 on exactly those channels."""

    def __init__(self, block, where="", native=False):
        super().__init__(block, ("maskgen1", "maskgen2", "maskgen3", "attgen2"), where, native)
        self.heads, self.width = block.heads, block.width
        self.conv1 = PointHeadConv(block.conv1, block.bn1, 1, native)
        self.conv2 = HeadConv(block.conv2, block.bn2, block.heads, native)
        self.conv3 = PointHeadConv(block.conv3, block.bn3, 1, native)
        self.downsample = None if block.downsample is None else FoldedConv(*block.downsample, native=native)

    def forward(self, x, h, w, macs, executed):
        g, ex = self.decide(x)
        s1 = self.sets(g, "maskgen1", None, 1, x.size(1))
        s2 = self.sets(g, "maskgen2", "attgen2", self.heads, self.width)
        s3 = self.sets(g, "maskgen3", None, 1, self.width)
        rows = s2.union_rows()
        y, _, _, m1 = self.conv1(x, h, w, s1.idx, s1.idx, [None], rows, RELU)
        y, ho, wo, m2 = self.conv2(y, h, w, s2.reading(y), s2.idx, s2.scale, s3.groups(self.heads).idx, RELU)
        identity, m4 = x, 0
        if self.downsample is not None:
            identity, _, _, m4 = self.downsample(x, h, w)
        out, _, _, m3 = self.conv3(y, ho, wo, [None], s3.idx, [None], None, RELU, identity)
        t = self.terms(h, w)[0]
        dgc1 = s1.mean * t["dgc1"]
        dgc = dgc1 + s2.mean * t["dgc2"] + s3.mean * t["dgc3"]
        bonus = s2.unread * dgc1 + self._bonus3(s2, s3, t["dgc2"])
        return out, ho, wo, macs + (t["main"] + t["gen"]) + dgc - bonus, executed + ex + m1 + m2 + m3 + m4

    def _bonus3(self, s2, s3, dgc2):
        """As :meth:`Bottleneck._bonus3`: conv2's share of the outputs that conv3 does not read."""
        if s2.open is None or s3.open is None:
            return 0.0
        per = self.width // self.heads
        terms = [(k / self.width) * ((per - o) / per) for k, o in zip(s2.open, s3.groups(self.heads).open)]
        return _row_sum(terms) * (dgc2 / self.heads)


class DeployedInvertedResidual(DeployedBlock):
    """MobileNetV2 block: expansion and depthwise convolution only on the hidden channels that some
    head of the projection reads (the bonus); each projection head reads its open channels."""

    def __init__(self, block, where="", native=False):
        super().__init__(block, ("maskgen", "attgen"), where, native)
        self.heads, self.hidden, self.expand = block.heads, block.hidden, block.expand
        self.residual = block.use_res_connect
        layers = list(block.conv)
        self.pw = PointHeadConv(layers[0][0], layers[0][1], 1, native) if self.expand else None
        dw = layers[1] if self.expand else layers[0]
        self.dw = DepthwiseConv(dw[0], dw[1], native)
        self.project = PointHeadConv(layers[-2], layers[-1], block.heads, native)

    def forward(self, x, h, w, macs, executed):
        g, ex = self.decide(x)
        s = self.sets(g, "maskgen", "attgen", self.heads, self.hidden)
        keep = s.union
        if self.pw is not None:
            y, _, _, m0 = self.pw(x, h, w, [None], [None], [None], s.union_rows(), RELU6)
        else:
            y, m0 = (x if keep is None else x.index_select(1, keep)), 0
        if keep is not None and y.size(1) != keep.numel():  # the expansion computed every channel
            y = y.index_select(1, keep)
        y, ho, wo, m1 = self.dw(y, h, w, keep, RELU6)
        out, _, _, m2 = self.project(y, ho, wo, s.pos, s.idx, s.scale, None, res=x if self.residual else None)
        t = self.terms(h, w)[0]
        macs = macs + (t["main"] + t["gen"]) + (s.mean * t["dgc"] - s.unread * t["pwdw"])
        return out, ho, wo, macs, executed + ex + m0 + m1 + m2


class DeployedDenseLayer(DeployedBlock):
    """DenseNet layer: pre-activation of the input, conv_1 from the open inputs to the channels some
    head reads (conv_2's BatchNorm folded into it), conv_2 per head. Returns only the new channels."""

    def __init__(self, layer, where="", native=False):
        super().__init__(layer, ("maskgen1", "maskgen2", "attgen2"), where, native)
        self.heads, self.hidden = layer.heads, layer.hidden
        self.preact = PreActivation(layer.conv_1.norm)
        self.conv1 = PointHeadConv(layer.conv_1.conv, layer.conv_2.norm, 1, native)
        self.conv2 = HeadConv(layer.conv_2.conv, None, layer.heads, native)

    def forward(self, x, h, w, macs, executed):
        """x may be a column slice of the stage's buffer; returns (new channels, h, w, macs, executed)."""
        y = self.preact(x)
        g, ex = self.decide(y)
        s1 = self.sets(g, "maskgen1", None, 1, x.size(1))
        s2 = self.sets(g, "maskgen2", "attgen2", self.heads, self.hidden)
        rows = s2.union_rows()
        z, _, _, m1 = self.conv1(y, h, w, s1.idx, s1.idx, [None], rows, RELU)
        out, _, _, m2 = self.conv2(z, h, w, s2.reading(z), s2.idx, s2.scale)
        macs = _two_conv_macs(macs, self.terms(h, w)[0], s1, s2)
        return out, h, w, macs, executed + x.numel() + ex + m1 + m2


def _two_conv_macs(macs, t, s1, s2):
    """Paper MACs of a block with a single-head gated conv whose outputs feed a multi-head one
    (ResNet basic block, DenseNet layer), as their ``forward`` counts them."""
    dgc1 = s1.mean * t["dgc1"]
    dgc = dgc1 + s2.mean * t["dgc2"]
    bonus = s2.unread * dgc1
    return macs + (t["main"] + t["gen"]) + dgc - bonus


def _row_sum(values):
    """Sum as torch sums one row of a float64 matrix: left to right up to four terms (checked), torch
    itself beyond."""
    if len(values) <= 4:
        total = 0.0
        for v in values:
            total += v
        return total
    return torch.tensor([values], dtype=torch.float64).sum(1).item()
