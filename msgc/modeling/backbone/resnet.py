"""MSGC ResNets in torchvision's layout (stride in the 3x3), gated block by block as the reference.

State-dict keys are torchvision's plus the reference's ``maskgen*`` / ``attgen*`` generators, so both
torchvision weights and original MSGC release checkpoints load without renaming.
"""
from collections import OrderedDict

import torch
from torch import nn

from ...utils.errors import InvalidValueError
from ..kit import msgc_conv2d
from ..layers import AttentionGenerator
from ..macs import conv_out
from .base import Backbone, GatedBlock
from .build import BACKBONE_REGISTRY

__all__ = ["MSGCResNet", "BasicBlock", "Bottleneck"]


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(GatedBlock):
    """Two 3x3 convs: conv1's input gated by a single-head mask, conv2 an MSGC convolution."""

    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample, grouping, attention, name="", base_width=64, groups=1):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise InvalidValueError(f"{name}: basic blocks have groups=1 and width 64 per group (as torchvision's)")
        heads = grouping.heads
        self.inplanes, self.planes, self.stride, self.heads = inplanes, planes, stride, heads
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = msgc_conv2d(planes, planes, 3, heads, where=name)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.maskgen1 = grouping.channel_mask(inplanes, inplanes, 4)
        self.maskgen2 = grouping.head_mask(inplanes, planes, 4)
        self.attgen1 = attention(inplanes, inplanes, 1, 4)
        self.attgen2 = attention(inplanes, planes, heads, 4)
        k = self.describe(inplanes, name)
        x = k.input
        g1 = k.channel_gate(self.maskgen1, self.attgen1, channels=inplanes)
        g2 = k.head_gate(self.maskgen2, self.attgen2, channels=planes, heads=heads)
        y = k.conv(x, self.conv1, self.bn1, gate=g1, act="relu", name="conv1")
        identity = x if downsample is None else k.conv(x, *downsample, norm_cost=False, name="downsample")
        y = k.conv(y, self.conv2, self.bn2, gate=g2, name="conv2")
        k.output(k.add(y, identity, act="relu"))


class Bottleneck(GatedBlock):
    """1x1 - 3x3 - 1x1: conv1 and conv3 inputs gated by single-head masks, conv2 an MSGC convolution."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, grouping, attention, name="",
                 base_width=64, groups=1):
        super().__init__()
        heads = grouping.heads
        width = int(planes * base_width / 64) * groups
        self.inplanes, self.width, self.planes, self.stride, self.heads = (
            inplanes, width, planes, stride, heads)
        self.host_groups = groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        # MSGC heads within each of the host's groups (ResNeXt: 32): see msgc_conv2d
        self.conv2 = msgc_conv2d(width, width, 3, heads, stride, groups, where=name)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.maskgen1 = grouping.channel_mask(inplanes, inplanes, 8)
        self.maskgen2 = grouping.head_mask(inplanes, width, 8)
        self.maskgen3 = grouping.channel_mask(inplanes, width, 8)
        self.attgen2 = attention(inplanes, width, heads, 8)
        k = self.describe(inplanes, name)
        x = k.input
        g1 = k.channel_gate(self.maskgen1, channels=inplanes)
        g2 = k.head_gate(self.maskgen2, self.attgen2, channels=width, heads=heads)
        g3 = k.channel_gate(self.maskgen3, channels=width)
        y = k.conv(x, self.conv1, self.bn1, gate=g1, act="relu", name="conv1")
        y = k.conv(y, self.conv2, self.bn2, gate=g2, act="relu", name="conv2")
        identity = x if downsample is None else k.conv(x, *downsample, norm_cost=False, name="downsample")
        y = k.conv(y, self.conv3, self.bn3, gate=g3, name="conv3")
        k.output(k.add(y, identity, act="relu"))


class MSGCResNet(Backbone):
    """ResNet-18/34/50/101 with MSGC blocks. Stages: ``stem``, ``res2`` ... ``res5``."""

    def __init__(self, block, layers, grouping, attention, num_classes=1000, width_mult=1.0,
                 stem="imagenet", groups=1, base_width=64):
        super().__init__(grouping.heads)
        if stem not in ("imagenet", "cifar"):
            raise InvalidValueError(f"MODEL.BACKBONE.STEM must be 'imagenet' or 'cifar', got '{stem}'")
        self.build_args = dict(block=block, layers=layers, num_classes=num_classes, width_mult=width_mult, stem=stem,
                               groups=groups, base_width=base_width)
        self.groups, self.base_width = groups, base_width
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
        extra = dict(base_width=self.base_width, groups=self.groups)
        layers = [block(self.inplanes, planes, stride, downsample, grouping, attention, f"{name}.0", **extra)]
        self.inplanes = planes * block.expansion
        for i in range(1, blocks):
            layers.append(block(self.inplanes, planes, 1, None, grouping, attention, f"{name}.{i}", **extra))
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

    def stem_macs(self, h, w):
        """(MACs of the stem on an h x w image as the paper counts them, its output h, w)."""
        c = self.stage_channels["stem"]
        if self.stem_kind == "imagenet":
            h, w = conv_out(h, 7, 3, 2), conv_out(w, 7, 3, 2)
            main = 49 * 3 * c * h * w + c * h * w
            h, w = conv_out(h, 3, 1, 2), conv_out(w, 3, 1, 2)
            return main + 4 * c * h * w, h, w
        return 9 * 3 * c * h * w + c * h * w, h, w


    def blocks(self):
        for i in range(1, 5):
            yield from getattr(self, f"layer{i}")

    def stem_layers(self):
        """The stem's modules in order (convolution, BatchNorm, ReLU, max-pooling)."""
        return [self.conv1, self.bn1, self.relu, self.maxpool]

    def forward_features(self, x):
        macs = x.new_full((x.size(0),), float(self.stem_macs(x.size(2), x.size(3))[0]), dtype=torch.float64)
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


def _register(name, block, layers, doc, **extra):
    def build(grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet"):
        return MSGCResNet(block, layers, grouping, attention, num_classes, width_mult, stem, **extra)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    BACKBONE_REGISTRY.register(name)(build)


_register("msgc_resnet18", BasicBlock, [2, 2, 2, 2], "MSGC ResNet-18 (the paper's ResNet-18 rows).")
_register("msgc_resnet34", BasicBlock, [3, 4, 6, 3], "MSGC ResNet-34.")
_register("msgc_resnet50", Bottleneck, [3, 4, 6, 3], "MSGC ResNet-50 (the paper's ResNet-50 rows).")
_register("msgc_resnet101", Bottleneck, [3, 4, 23, 3], "MSGC ResNet-101.")
_register("msgc_resnext50_32x4d", Bottleneck, [3, 4, 6, 3],
          "MSGC ResNeXt-50 32x4d: the MSGC heads of each 3x3 work within each of its 32 groups.", groups=32,
          base_width=4)
_register("msgc_wide_resnet50_2", Bottleneck, [3, 4, 6, 3], "MSGC Wide ResNet-50-2 (bottlenecks twice as wide).",
          base_width=128)
