"""MSGC RegNetY in torchvision's layout: its state-dict keys are torchvision's (``stem``,
``trunk_output.block{i}.block{i}-{j}.f.{a,b,se,c}``, ``proj``, ``fc``) plus the generators, so its
weights load without renaming.

Where the gates go. RegNet's block is a 1x1 (a), a grouped 3x3 with group width 16 (b), a
squeeze-excitation on b's output and a 1x1 (c). The MSGC heads belong in b, where the network's own
group structure lives: each host group is a small dense convolution, and its outputs are split among
the heads, each reading the channels of the group that its mask opens (as for ResNeXt). a and c get
one-head channel gates, as ResNet-50's 1x1s do, and a computes only the channels some head of b
reads. The squeeze-excitation pools all of b's output channels, so b computes every output and c's
gate saves c's own work only (no bonus between b and c); the excitation scale is folded into c's
input like attention.
"""
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from ...utils.errors import InvalidValueError
from ..kit import msgc_conv2d
from ..layers import AttentionGenerator
from ..macs import conv_out
from .base import Backbone, GatedBlock
from .build import BACKBONE_REGISTRY

__all__ = ["MSGCRegNet", "RegNetBlock"]


class RegNetBlock(GatedBlock):
    """torchvision's ``ResBottleneckBlock`` (bottleneck multiplier 1) with MSGC gates (see the module)."""

    def __init__(self, w_in, w_out, stride, group_width, se_ratio, grouping, attention, name=""):
        super().__init__()
        heads, groups = grouping.heads, w_out // group_width
        self.w_in, self.width, self.stride, self.heads, self.host_groups = w_in, w_out, stride, heads, groups
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False), nn.BatchNorm2d(w_out))
        self.f = nn.Sequential(OrderedDict(
            a=nn.Sequential(nn.Conv2d(w_in, w_out, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)),
            b=nn.Sequential(msgc_conv2d(w_out, w_out, 3, heads, stride, groups, where=f"{name}.f.b"),
                            nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)),
            se=SqueezeExcitation(w_out, int(round(se_ratio * w_in))),
            c=nn.Sequential(nn.Conv2d(w_out, w_out, 1, bias=False), nn.BatchNorm2d(w_out))))
        self.maskgen1 = grouping.channel_mask(w_in, w_in, 8)
        self.maskgen2 = grouping.head_mask(w_in, w_out, 8)
        self.maskgen3 = grouping.channel_mask(w_in, w_out, 8)
        self.attgen2 = attention(w_in, w_out, heads, 8)
        k = self.describe(w_in, name)
        x = k.input
        g1 = k.channel_gate(self.maskgen1, channels=w_in)
        g2 = k.head_gate(self.maskgen2, self.attgen2, channels=w_out, heads=heads)
        g3 = k.channel_gate(self.maskgen3, channels=w_out)
        f = self.f
        y = k.conv(x, f.a[0], f.a[1], gate=g1, act="relu", name="f.a")
        y = k.conv(y, f.b[0], f.b[1], gate=g2, act="relu", name="f.b")
        y = k.squeeze_excitation(y, f.se, name="f.se")
        identity = x if self.proj is None else k.conv(x, self.proj[0], self.proj[1], norm_cost=False, name="proj")
        y = k.conv(y, f.c[0], f.c[1], gate=g3, name="f.c")
        k.output(k.add(y, identity, act="relu"))


class MSGCRegNet(Backbone):
    """RegNetY with MSGC blocks. Stages: ``stem``, ``res2`` ... ``res5`` (strides 2 ... 32)."""

    def __init__(self, grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet",
                 depths=(1, 3, 8, 2), widths=(64, 144, 320, 784), group_width=16, se_ratio=0.25, stem_width=32):
        super().__init__(grouping.heads)
        if stem not in ("imagenet", "cifar"):
            raise InvalidValueError(f"MODEL.BACKBONE.STEM must be 'imagenet' or 'cifar', got '{stem}'")
        self.build_args = dict(num_classes=num_classes, width_mult=width_mult, stem=stem, depths=depths, widths=widths,
                               group_width=group_width, se_ratio=se_ratio, stem_width=stem_width)
        # widths stay multiples of the group width (RegNet's quantisation)
        widths = [max(group_width, int(round(w * width_mult / group_width)) * group_width) for w in widths]
        self.stem_stride = 2 if stem == "imagenet" else 1
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 3, self.stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        self.stage_channels, self.stage_strides = {"stem": stem_width}, {"stem": self.stem_stride}
        stages, w_in, stride = OrderedDict(), stem_width, self.stem_stride
        for i, (depth, w) in enumerate(zip(depths, widths), start=1):
            blocks = OrderedDict()
            for j in range(depth):
                name = f"trunk_output.block{i}.block{i}-{j}"
                blocks[f"block{i}-{j}"] = RegNetBlock(w_in, w, 2 if j == 0 else 1, group_width, se_ratio, grouping,
                                                      attention, name)
                w_in = w
            stages[f"block{i}"] = nn.Sequential(blocks)
            stride *= 2
            self.stage_channels[f"res{i + 1}"], self.stage_strides[f"res{i + 1}"] = w, stride
        self.trunk_output = nn.Sequential(stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w_in, num_classes)
        self.num_classes = num_classes
        self._init_weights()

    def _init_weights(self):  # as torchvision's RegNet
        import math

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # attention starts at exactly 1
            if isinstance(m, AttentionGenerator):
                m.reset_output()

    def blocks(self):
        for stage in self.trunk_output:
            yield from stage

    def stem_layers(self):
        """The stem's modules in order (convolution, BatchNorm, ReLU)."""
        return list(self.stem)

    def stem_macs(self, h, w):
        """(MACs of the stem on an h x w image: its 3x3 and BatchNorm, its output h, w)."""
        c = self.stage_channels["stem"]
        h, w = conv_out(h, 3, 1, self.stem_stride), conv_out(w, 3, 1, self.stem_stride)
        return 27 * c * h * w + c * h * w, h, w

    def head_macs(self, h, w):
        return self.fc.in_features * (h * w + self.num_classes)


    def forward_features(self, x):
        macs = x.new_full((x.size(0),), float(self.stem_macs(x.size(2), x.size(3))[0]), dtype=torch.float64)
        x = self.stem(x)
        feats = OrderedDict(stem=x)
        state = (x, macs)
        for i, stage in enumerate(self.trunk_output, start=2):
            state = stage(state)
            feats[f"res{i}"] = state[0]
        return feats, state[1]

    def forward_head(self, features):
        return self.fc(torch.flatten(self.avgpool(features["res5"]), 1))


@BACKBONE_REGISTRY.register("msgc_regnet_y_800mf")
def msgc_regnet_y_800mf(grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet"):
    """MSGC RegNetY-800MF (torchvision's regnet_y_800mf: depths 1, 3, 8, 2; widths 64, 144, 320, 784;
    group width 16; squeeze-excitation 0.25)."""
    return MSGCRegNet(grouping, attention, num_classes, width_mult, stem)
