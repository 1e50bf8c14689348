"""MSGC ResNets in torchvision's layout (stride in the 3x3), gated block by block as the reference.

State-dict keys are torchvision's plus the reference's ``maskgen*`` / ``attgen*`` generators, so both
torchvision weights and original MSGC release checkpoints load without renaming.
"""
from collections import OrderedDict

import torch
from torch import nn

from ...utils.errors import InvalidValueError
from ..layers import AttentionGenerator, gate_channels, gated_conv
from ..macs import Costs, conv_out
from .base import Backbone, GatedBlock, mask_mean, unread_fraction
from .build import BACKBONE_REGISTRY

__all__ = ["MSGCResNet", "BasicBlock", "Bottleneck"]


def _conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


def _check_heads(channels, heads, where):
    if channels % heads:
        raise InvalidValueError(f"{where}: MODEL.MSGC.HEADS={heads} does not divide its {channels} channels")


class BasicBlock(GatedBlock):
    """Two 3x3 convs: conv1's input gated by a single-head mask, conv2 an MSGC convolution."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, grouping, attention, name=""):
        super().__init__()
        heads = grouping.heads
        _check_heads(planes, heads, name)
        self.inplanes, self.planes, self.stride, self.heads = inplanes, planes, stride, heads
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes * heads, planes, groups=heads)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.maskgen1 = grouping.channel_mask(inplanes, inplanes, 4)
        self.maskgen2 = grouping.head_mask(inplanes, planes, 4)
        self.attgen1 = attention(inplanes, inplanes, 1, 4)
        self.attgen2 = attention(inplanes, planes, heads, 4)
        self._finish([self.maskgen1, self.maskgen2, self.attgen1, self.attgen2])

    def block_costs(self, h, w):
        cin, p, heads = self.inplanes, self.planes, self.heads
        att = self.attgen2 is not None
        ho, wo = conv_out(h, 3, 1, self.stride), conv_out(w, 3, 1, self.stride)
        t = {"main": 0, "extra": 0}
        t["dgc1"] = (cin * h * w if att else 0) + 9 * cin * p * ho * wo + p * ho * wo
        t["dgc2"] = (9 * p + 1) * p * ho * wo + (heads * p * ho * wo if att else 0)
        if att:
            t["extra"] = cin * h * w + heads * p * ho * wo
        if self.downsample is not None:
            t["main"] = cin * p * self.expansion * conv_out(h, 1, 0, self.stride) * conv_out(w, 1, 0, self.stride)
        t["gen"] = self.pool_cost(h, w, cin) + sum(
            g.macs for g in (self.maskgen1, self.maskgen2, self.attgen1, self.attgen2) if g is not None)
        return t, ho, wo

    def forward(self, x_macs):
        x, macs = x_macs
        n = x.size(0)
        ctx = self.context(x)
        m1 = self.maskgen1(ctx) if self.maskgen1 is not None else None
        m2 = self.maskgen2(ctx) if self.maskgen2 is not None else None
        a1 = self.attgen1(ctx) if self.attgen1 is not None else None
        a2 = self.attgen2(ctx) if self.attgen2 is not None else None

        out = self.relu(self.bn1(self.conv1(gate_channels(x, m1, a1))))
        out = self.bn2(gated_conv(self.conv2, out, m2, a2))
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(out + identity)

        t, _, _ = self.terms(x.size(2), x.size(3))
        dgc1 = mask_mean(m1, n, x) * t["dgc1"]
        dgc = dgc1 + mask_mean(m2, n, x) * t["dgc2"]
        bonus = unread_fraction(m2, n, x) * dgc1.detach()
        return out, macs + (t["main"] + t["gen"]) + dgc - bonus


class Bottleneck(GatedBlock):
    """1x1 - 3x3 - 1x1: conv1 and conv3 inputs gated by single-head masks, conv2 an MSGC convolution."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, grouping, attention, name="",
                 base_width=64):
        super().__init__()
        heads = grouping.heads
        width = int(planes * base_width / 64)
        _check_heads(width, heads, name)
        self.inplanes, self.width, self.planes, self.stride, self.heads = (
            inplanes, width, planes, stride, heads)
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width * heads, width, stride, groups=heads)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.maskgen1 = grouping.channel_mask(inplanes, inplanes, 8)
        self.maskgen2 = grouping.head_mask(inplanes, width, 8)
        self.maskgen3 = grouping.channel_mask(inplanes, width, 8)
        self.attgen2 = attention(inplanes, width, heads, 8)
        self._finish([self.maskgen1, self.maskgen2, self.maskgen3, self.attgen2])

    def block_costs(self, h, w):
        cin, wd, heads, cout = self.inplanes, self.width, self.heads, self.planes * self.expansion
        att = self.attgen2 is not None
        ho, wo = conv_out(h, 3, 1, self.stride), conv_out(w, 3, 1, self.stride)
        t = {"main": 0, "extra": heads * wd * h * w if att else 0}
        t["dgc1"] = cin * wd * h * w + wd * h * w
        t["dgc2"] = t["extra"] + 9 * wd * wd * ho * wo + wd * ho * wo
        t["dgc3"] = (wd + 1) * cout * ho * wo
        if self.downsample is not None:
            t["main"] = cin * cout * conv_out(h, 1, 0, self.stride) * conv_out(w, 1, 0, self.stride)
        t["gen"] = self.pool_cost(h, w, cin) + sum(
            g.macs for g in (self.maskgen1, self.maskgen2, self.maskgen3, self.attgen2) if g is not None)
        return t, ho, wo

    def forward(self, x_macs):
        x, macs = x_macs
        n = x.size(0)
        ctx = self.context(x)
        m1 = self.maskgen1(ctx) if self.maskgen1 is not None else None
        m2 = self.maskgen2(ctx) if self.maskgen2 is not None else None
        m3 = self.maskgen3(ctx) if self.maskgen3 is not None else None
        a2 = self.attgen2(ctx) if self.attgen2 is not None else None

        out = self.relu(self.bn1(self.conv1(gate_channels(x, m1))))
        out = self.relu(self.bn2(gated_conv(self.conv2, out, m2, a2)))
        out = self.bn3(self.conv3(gate_channels(out, m3)))
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(out + identity)

        t, _, _ = self.terms(x.size(2), x.size(3))
        dgc1 = mask_mean(m1, n, x) * t["dgc1"]
        dgc = dgc1 + mask_mean(m2, n, x) * t["dgc2"] + mask_mean(m3, n, x) * t["dgc3"]
        bonus = unread_fraction(m2, n, x) * dgc1.detach() + self._bonus3(m2, m3, t["dgc2"])
        return out, macs + (t["main"] + t["gen"]) + dgc - bonus

    def _bonus3(self, m2, m3, dgc2):
        """conv2's output channels that conv3 does not read: each head's share of them is skipped."""
        if m2 is None or m3 is None:
            return 0.0
        heads = m2.size(1)
        head_open = m2.detach().double().mean(2)  # N x heads
        unread = (1.0 - m3.detach()[:, 0].double()).view(m3.size(0), heads, -1).mean(2)  # N x heads
        return (head_open * unread).sum(1) * (dgc2 / heads)


class MSGCResNet(Backbone):
    """ResNet-18/34/50/101 with MSGC blocks. Stages: ``stem``, ``res2`` ... ``res5``."""

    def __init__(self, block, layers, grouping, attention, num_classes=1000, width_mult=1.0,
                 stem="imagenet"):
        super().__init__(grouping.heads)
        if stem not in ("imagenet", "cifar"):
            raise InvalidValueError(f"MODEL.BACKBONE.STEM must be 'imagenet' or 'cifar', got '{stem}'")
        self.stem_kind = stem
        widths = [max(1, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.stage_channels, self.stage_strides = {"stem": self.inplanes}, {"stem": 4 if stem == "imagenet" else 1}
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            name = f"layer{i + 1}"
            setattr(self, name, self._make_layer(block, planes, blocks, stride, grouping, attention, name))
            self.stage_channels[f"res{i + 2}"] = self.inplanes
            self.stage_strides[f"res{i + 2}"] = self.stage_strides["stem"] * 2 ** i
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        self.num_classes = num_classes
        self._init_weights()

    def _make_layer(self, block, planes, blocks, stride, grouping, attention, name):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, grouping, attention, f"{name}.0")]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, None, grouping, attention, f"{name}.{i}"))
        return nn.Sequential(*layers)

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # generators keep their own starting values
            if isinstance(m, AttentionGenerator):
                m.reset_output()

    def _stem_costs(self, h, w):
        c = self.stage_channels["stem"]
        if self.stem_kind == "imagenet":
            h, w = conv_out(h, 7, 3, 2), conv_out(w, 7, 3, 2)
            main = 49 * 3 * c * h * w + c * h * w
            h, w = conv_out(h, 3, 1, 2), conv_out(w, 3, 1, 2)
            return main + 4 * c * h * w, h, w
        return 9 * 3 * c * h * w + c * h * w, h, w

    def complexity(self, h, w):
        main, h, w = self._stem_costs(h, w)
        total = Costs(main=main)
        for blk in self.blocks():
            c, h, w = blk.costs(h, w)
            total = total + c
        return total + Costs(main=self.head_macs(h, w))

    def blocks(self):
        for i in range(1, 5):
            yield from getattr(self, f"layer{i}")

    def forward_features(self, x):
        macs = x.new_full((x.size(0),), float(self._stem_costs(x.size(2), x.size(3))[0]), dtype=torch.float64)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = OrderedDict(stem=x)
        state = (x, macs)
        for i in range(1, 5):
            state = getattr(self, f"layer{i}")(state)
            feats[f"res{i + 1}"] = state[0]
        return feats, state[1]

    def forward_head(self, features):
        return self.fc(torch.flatten(self.avgpool(features["res5"]), 1))

    def head_macs(self, h, w):
        return self.fc.in_features * (h * w + self.num_classes)


def _register(name, block, layers, doc):
    def build(grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet"):
        return MSGCResNet(block, layers, grouping, attention, num_classes, width_mult, stem)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    BACKBONE_REGISTRY.register(name)(build)


_register("msgc_resnet18", BasicBlock, [2, 2, 2, 2], "MSGC ResNet-18 (the paper's ResNet-18 rows).")
_register("msgc_resnet34", BasicBlock, [3, 4, 6, 3], "MSGC ResNet-34.")
_register("msgc_resnet50", Bottleneck, [3, 4, 6, 3], "MSGC ResNet-50 (the paper's ResNet-50 rows).")
_register("msgc_resnet101", Bottleneck, [3, 4, 23, 3], "MSGC ResNet-101.")
