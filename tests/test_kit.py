"""The gated-block kit: its derived costs against the paper's hand-written terms for every block of the
four paper hosts, its per-sample count against the hand-written formulas, and its errors."""
import random

import pytest
import torch
from torch import nn

from conftest import narrow
from msgc.modeling import build_model
from msgc.modeling.backbone.base import GatedBlock
from msgc.modeling.backbone.condensenet import DenseLayer
from msgc.modeling.backbone.mobilenetv2 import InvertedResidual
from msgc.modeling.backbone.resnet import BasicBlock, Bottleneck
from msgc.modeling.grouping import MSGCGrouping
from msgc.modeling.layers import Generator
from msgc.modeling.macs import MaskStats, conv_out, row_sum

HOSTS = ["msgc_resnet18", "msgc_resnet50", "msgc_mobilenetv2", "msgc_condensenet"]


# ---- the paper's terms, written by hand as the reference's get_flops() counts them ----------------------

def _pool(block, h, w, channels, rule):
    modules = [m for g in block.spec.gates for m in (g.mask, g.attention) if m is not None]
    counted = any(isinstance(m, Generator) for m in modules) if rule == "generators" else bool(modules)
    return (h * w * channels if counted else 0) + sum(getattr(m, "macs", 0) for m in modules)


def paper_terms(block, h, w):
    """(dict of terms by the kit's node names, main, gen, extra) of one block."""
    if isinstance(block, BasicBlock):
        cin, p, heads, att = block.inplanes, block.planes, block.heads, block.attgen2 is not None
        ho, wo = conv_out(h, 3, 1, block.stride), conv_out(w, 3, 1, block.stride)
        t = {"conv1": (cin * h * w if att else 0) + 9 * cin * p * ho * wo + p * ho * wo,
             "conv2": (9 * p + 1) * p * ho * wo + (heads * p * ho * wo if att else 0)}
        main = cin * p * conv_out(h, 1, 0, block.stride) * conv_out(w, 1, 0, block.stride) if block.downsample else 0
        if block.downsample is not None:
            t["downsample"] = main
        extra = cin * h * w + heads * p * ho * wo if att else 0
        return t, main, _pool(block, h, w, cin, "generators"), extra
    if isinstance(block, Bottleneck):
        cin, wd, heads, cout = block.inplanes, block.width, block.heads, block.planes * 4
        att = block.attgen2 is not None
        ho, wo = conv_out(h, 3, 1, block.stride), conv_out(w, 3, 1, block.stride)
        extra = heads * wd * h * w if att else 0
        t = {"conv1": cin * wd * h * w + wd * h * w, "conv2": extra + 9 * wd * wd * ho * wo + wd * ho * wo,
             "conv3": (wd + 1) * cout * ho * wo}
        main = cin * cout * conv_out(h, 1, 0, block.stride) * conv_out(w, 1, 0, block.stride) if block.downsample else 0
        if block.downsample is not None:
            t["downsample"] = main
        return t, main, _pool(block, h, w, cin, "generators"), extra
    if isinstance(block, InvertedResidual):
        cin, hid, heads, att = block.inp, block.hidden, block.heads, block.attgen is not None
        ho, wo = conv_out(h, 3, 1, block.stride), conv_out(w, 3, 1, block.stride)
        t = {"depthwise": 9 * hid * ho * wo + hid * ho * wo,
             "project": hid * (block.oup + (heads if att else 0)) * ho * wo}
        if block.expand:
            t["expansion"] = cin * hid * h * w + hid * h * w
        main = t["depthwise"] + t.get("expansion", 0)
        return t, main, _pool(block, h, w, cin, "modules"), heads * hid * ho * wo if att else 0
    if isinstance(block, DenseLayer):
        cin, hid, heads, att = block.in_channels, block.hidden, block.heads, block.attgen2 is not None
        t = {"conv_1.norm": cin * h * w, "conv_1": cin * hid * h * w,
             "conv_2": hid * (9 * block.growth + (heads if att else 0) + 1) * h * w}
        return t, cin * h * w, _pool(block, h, w, cin, "modules"), heads * hid * h * w if att else 0
    raise TypeError(type(block).__name__)


def paper_sample_macs(block, h, w, masks):
    """The hand-written per-sample formulas (one sample, MaskStats from counts)."""
    t, main, gen, _ = paper_terms(block, h, w)
    if isinstance(block, (BasicBlock, DenseLayer)):
        first, second = ("conv1", "conv2") if isinstance(block, BasicBlock) else ("conv_1", "conv_2")
        m1, m2 = masks
        dgc1 = m1.mean * t[first]
        return (main + gen) + (dgc1 + m2.mean * t[second]) - m2.unread * dgc1
    if isinstance(block, Bottleneck):
        m1, m2, m3 = masks
        dgc1 = m1.mean * t["conv1"]
        dgc = dgc1 + m2.mean * t["conv2"] + m3.mean * t["conv3"]
        bonus3 = 0.0
        if m2.head_open() is not None and m3.group_unread(m2.heads) is not None:
            terms = [a * b for a, b in zip(m2.head_open(), m3.group_unread(m2.heads))]
            bonus3 = row_sum(terms) * (t["conv2"] / m2.heads)
        return (main + gen) + dgc - (m2.unread * dgc1 + bonus3)
    (m,) = masks
    pwdw = t["depthwise"] + t.get("expansion", 0)
    return (main + gen) + m.mean * t["project"] - m.unread * pwdw


def _blocks(backbone):
    if hasattr(backbone, "stages"):
        return [layer for stage in backbone.stages() for layer in stage]
    return list(backbone.blocks())


def _walk_all(backbone, size):
    """(block, h, w) at each block's input."""
    h, w = backbone.stem_macs(size, size)[1:]
    if not hasattr(backbone, "stages"):
        for blk in backbone.blocks():
            yield blk, h, w
            h, w = blk.costs(h, w)[1:]
        return
    for i, stage in enumerate(backbone.stages()):
        if i:
            h, w = h // 2, w // 2
        for layer in stage:
            yield layer, h, w


@pytest.mark.parametrize("attention", ["none", "channel"])
@pytest.mark.parametrize("grouping", ["msgc", "prune", "static", "dense"])
@pytest.mark.parametrize("name", HOSTS)
def test_kit_costs_are_the_paper_terms(cfg, name, grouping, attention):
    """Every block of every paper host at 224x224: the kit's terms, derived from the modules' shapes,
    equal the hand-written ones, node by node, and so do main, gen and extra."""
    cfg.MODEL.BACKBONE.NAME = name
    cfg.MODEL.MSGC.GROUPING, cfg.MODEL.MSGC.ATTENTION = grouping, attention
    backbone = build_model(cfg).backbone
    checked = 0
    for blk, h, w in _walk_all(backbone, 224):
        t, main, gen, extra = paper_terms(blk, h, w)
        kit = blk.spec.terms(h, w)
        got = {n.name: kit.cost[n] for n in blk.spec.nodes if n in kit.cost and kit.cost[n]}
        assert got == {k: v for k, v in t.items() if v}, (blk.spec.where, got, t)
        assert (kit.main, kit.gen, kit.extra) == (main, gen, extra), blk.spec.where
        checked += 1
    assert checked == len(_blocks(backbone))


@pytest.mark.parametrize("name", HOSTS)
def test_kit_sample_macs_are_the_paper_formulas(cfg, name):
    """Random open counts: the kit's per-sample count equals the hand-written formulas (up to the order
    of float additions)."""
    backbone = build_model(narrow(cfg, name, "msgc", "channel")).backbone
    rnd = random.Random(0)
    for blk, h, w in _walk_all(backbone, 16):
        masks = []
        for gate in blk.spec.gates:
            heads = gate.heads if gate.kind == "heads" else 1
            counts = [rnd.randint(0, gate.channels) for _ in range(heads)]
            union = rnd.randint(max(counts), gate.channels) if heads > 1 else counts[0]
            groups = None
            if heads == 1 and gate.channels % 4 == 0:
                per = gate.channels // 4
                groups = [rnd.randint(0, per) for _ in range(4)]
                counts = [sum(groups)]
                union = counts[0]
            masks.append(MaskStats.from_counts(counts, union, gate.channels, groups))
        want = paper_sample_macs(blk, h, w, masks)
        assert blk.sample_macs(h, w, *masks) == pytest.approx(want, rel=1e-12)


def _counts(mask):
    """MaskStats of each sample of a mask tensor N x heads x C, from its counts."""
    out = []
    for m in mask:
        open_ = m > 0
        groups = open_[0].view(4, -1).sum(1).tolist() if m.size(0) == 1 and m.size(1) % 4 == 0 else None
        out.append(MaskStats.from_counts(open_.sum(1).tolist(), int(open_.any(0).sum()), m.size(1), groups))
    return out


@pytest.mark.parametrize("name", ["msgc_resnet50", "msgc_condensenet"])
def test_the_model_counts_with_the_paper_formulas(cfg, name):
    """The forward pass's per-sample MACs, block by block, are the hand-written formulas on the masks
    the gates produced."""
    model = build_model(narrow(cfg, name, "msgc", "channel")).eval()
    with torch.no_grad():  # gates that differ between samples
        for m in model.modules():
            if isinstance(m, Generator) and hasattr(m, "gate"):
                m.second.bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(m.channels))
    seen, masks = [], {}
    for blk, _, _ in _walk_all(model.backbone, 16):
        blk.register_forward_hook(lambda b, i, o: seen.append((b, i[0][0].shape, i[0][1], o[1])))
        for g in blk.spec.gates:
            g.mask.register_forward_hook(lambda m, i, o: masks.__setitem__(m, o))
    model(torch.randn(3, 3, 16, 16) + torch.randn(3, 3, 1, 1))
    assert len(seen) == len(_blocks(model.backbone))
    differ = 0
    for blk, shape, before, after in seen:
        per_sample = list(zip(*[_counts(masks[g.mask]) for g in blk.spec.gates]))
        for i, stats in enumerate(per_sample):
            want = paper_sample_macs(blk, shape[2], shape[3], stats)
            assert (after - before)[i].item() == pytest.approx(want, rel=1e-12)
        differ += len({round((after - before)[i].item()) for i in range(3)}) > 1
    assert differ  # the check saw different gates


def _grouping(heads=4):
    return MSGCGrouping(heads=heads)


def test_heads_that_do_not_divide_a_layer_name_it():
    with pytest.raises(ValueError, match=r"layer2\.0: MODEL\.MSGC\.HEADS=3 does not divide its 128 output channels"):
        BasicBlock(64, 128, 2, None, MSGCGrouping(heads=3), lambda *a: None, "layer2.0")

    from msgc.modeling.kit import msgc_conv2d

    with pytest.raises(ValueError, match=r"blocks\.7\.proj: MODEL\.MSGC\.HEADS=3 does not divide its 10 output"):
        msgc_conv2d(8, 10, 3, heads=3, where="blocks.7.proj")
    assert msgc_conv2d(8, 12, 3, heads=3).weight.shape == (12, 8, 3, 3)  # the dense convolution's shape


def test_gates_need_their_context_before_the_first_gated_convolution():
    class Late(GatedBlock):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 1)
            self.conv2 = nn.Conv2d(8, 8, 1)
            self.mask = _grouping(1).channel_mask(8, 8, 4)
            k = self.describe(8, "blocks.2")
            y = k.conv(k.input, self.conv1, gate=k.channel_gate(self.mask, channels=8), name="first")
            k.context(k.conv(y, self.conv2, name="second"))  # made after the convolution that needs the gate
            k.output(y)

    with pytest.raises(ValueError, match=r"blocks\.2: the gates read the context made by blocks\.2\.second, "
                                         r"after blocks\.2\.first that needs them"):
        Late()


def test_a_gate_on_the_wrong_convolution_is_an_error():
    class Wrong(GatedBlock):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)  # not grouped by the 4 heads of its gate
            self.mask = _grouping(4).head_mask(8, 8, 4)
            k = self.describe(8, "blocks.0")
            k.output(k.conv(k.input, self.conv, gate=k.head_gate(self.mask, channels=8, heads=4), name="c"))

    with pytest.raises(ValueError, match=r"blocks\.0\.c: a heads gate of 4 heads needs a convolution over 32 channels"):
        Wrong()
