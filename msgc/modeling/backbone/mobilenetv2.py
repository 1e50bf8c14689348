"""MSGC MobileNetV2 in torchvision's layout: each block's projection (1x1) is an MSGC convolution."""
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models._utils import _make_divisible

from ...utils.errors import InvalidValueError
from ..layers import AttentionGenerator
from ..macs import Costs, conv_out
from .base import Backbone, GatedBlock
from .build import BACKBONE_REGISTRY

__all__ = ["MSGCMobileNetV2", "InvertedResidual"]

# t (expansion), c (channels), n (blocks), s (first stride)
_IMAGENET_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
                     [6, 160, 3, 2], [6, 320, 1, 1]]
_CIFAR_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 1], [6, 96, 3, 2],
                  [6, 160, 3, 1], [6, 320, 1, 1]]


def _conv_bn_relu6(cin, cout, kernel=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(GatedBlock):
    """Expansion 1x1, depthwise 3x3, then the gated projection: ``conv = [pw, dw, msgc 1x1, bn]``."""

    def __init__(self, inp, oup, stride, expand_ratio, grouping, attention, name=""):
        super().__init__()
        heads = grouping.heads
        hidden = int(round(inp * expand_ratio))
        if oup % heads:
            raise InvalidValueError(f"{name}: MODEL.MSGC.HEADS={heads} does not divide its {oup} output channels")
        self.inp, self.oup, self.hidden, self.stride, self.heads = inp, oup, hidden, stride, heads
        self.expand = expand_ratio != 1
        self.use_res_connect = stride == 1 and inp == oup
        layers = [_conv_bn_relu6(inp, hidden, 1)] if self.expand else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden * heads, oup, 1, groups=heads, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.maskgen = grouping.head_mask(inp, hidden, 4)
        self.attgen = attention(inp, hidden, heads, 4)
        # the reference counts the context pooling of MobileNetV2's blocks wherever a gate module exists
        k = self.describe(inp, name, context_cost="modules")
        x = y = k.input
        g = k.head_gate(self.maskgen, self.attgen, channels=hidden, heads=heads)
        if self.expand:
            y = k.conv(y, self.expansion[0], self.expansion[1], act="relu6", name="expansion")
        y = k.conv(y, self.depthwise[0], self.depthwise[1], act="relu6", name="depthwise")
        # (the reference does not count the projection's BatchNorm)
        y = k.conv(y, self.project[0], self.project[1], gate=g, norm_cost=False, name="project")
        k.output(k.add(x, y) if self.use_res_connect else y)

    @property
    def expansion(self):
        """The expansion (1x1 conv, BatchNorm, ReLU6), or None for expansion ratio 1."""
        return self.conv[0] if self.expand else None

    @property
    def depthwise(self):
        """The depthwise 3x3 (conv, BatchNorm, ReLU6)."""
        return self.conv[1] if self.expand else self.conv[0]

    @property
    def project(self):
        """The gated projection (1x1, ``groups = heads``) and its BatchNorm."""
        return self.conv[-2], self.conv[-1]


class MSGCMobileNetV2(Backbone):
    """MobileNetV2 with MSGC projections. Stages: ``stem`` and ``res2`` ... ``res5`` (strides 4-32)."""

    def __init__(self, grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet",
                 round_nearest=8):
        super().__init__(grouping.heads)
        if stem not in ("imagenet", "cifar"):
            raise InvalidValueError(f"MODEL.BACKBONE.STEM must be 'imagenet' or 'cifar', got '{stem}'")
        self.build_args = dict(num_classes=num_classes, width_mult=width_mult, stem=stem, round_nearest=round_nearest)
        setting, first_stride = (_IMAGENET_SETTING, 2) if stem == "imagenet" else (_CIFAR_SETTING, 1)
        cin = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        self.first_stride = first_stride
        features = [_conv_bn_relu6(3, cin, 3, first_stride)]
        stride, self.stage_ends = first_stride, {}
        self.stage_channels, self.stage_strides = {"stem": cin}, {"stem": first_stride}
        for t, c, n, s in setting:
            cout = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                if s == 2 and i == 0 and stride >= 4:  # the previous block closes a stage
                    self._mark_stage(len(features) - 1, cin, stride)
                stride *= s if i == 0 else 1
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t, grouping, attention,
                                                 f"features.{len(features)}"))
                cin = cout
        features.append(_conv_bn_relu6(cin, self.last_channel, 1))
        self._mark_stage(len(features) - 1, self.last_channel, stride)
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(self.last_channel, num_classes))
        self.num_classes = num_classes
        self._init_weights()

    def _mark_stage(self, index, channels, stride):
        name = f"res{len(self.stage_ends) + 2}"
        self.stage_ends[index] = name
        self.stage_channels[name], self.stage_strides[name] = channels, stride

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AttentionGenerator):
                m.reset_output()

    def stem_macs(self, h, w):
        """(MACs of the stem on an h x w image, its output h, w)."""
        c = self.stage_channels["stem"]
        h, w = conv_out(h, 3, 1, self.first_stride), conv_out(w, 3, 1, self.first_stride)
        return 27 * c * h * w + c * h * w, h, w

    def last_macs(self, h, w):
        """MACs of the last 1x1 convolution (and its BatchNorm) on an h x w map."""
        cin = self.features[-1][0].in_channels
        return h * w * cin * self.last_channel + self.last_channel * h * w

    def head_macs(self, h, w):
        return self.last_channel * self.num_classes + self.last_channel * h * w

    @property
    def stem(self):
        """The first convolution (conv, BatchNorm, ReLU6)."""
        return self.features[0]

    @property
    def last_conv(self):
        """The last 1x1 convolution (conv, BatchNorm, ReLU6)."""
        return self.features[-1]

    @property
    def fc(self):
        return self.classifier[-1]

    def blocks(self):
        """The inverted residual blocks, in order."""
        return list(self.features[1:-1])

    def complexity(self, h, w):
        main, h, w = self.stem_macs(h, w)
        total = Costs(main=main)
        for blk in self.blocks():
            c, h, w = blk.costs(h, w)
            total = total + c
        return total + Costs(main=self.last_macs(h, w) + self.head_macs(h, w))

    def forward_features(self, x):
        macs = x.new_full((x.size(0),), float(self.stem_macs(x.size(2), x.size(3))[0]), dtype=torch.float64)
        x = self.features[0](x)
        feats = OrderedDict(stem=x)
        state = (x, macs)
        for i, blk in enumerate(self.features[1:-1], start=1):
            state = blk(state)
            if i in self.stage_ends:
                feats[self.stage_ends[i]] = state[0]
        x, macs = state
        macs = macs + self.last_macs(x.size(2), x.size(3))
        feats[self.stage_ends[len(self.features) - 1]] = self.features[-1](x)
        return feats, macs

    def forward_head(self, features):
        x = features[next(reversed(features))]
        return self.classifier(x.mean((2, 3)))


@BACKBONE_REGISTRY.register("msgc_mobilenetv2")
def msgc_mobilenetv2(grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet"):
    """MSGC MobileNetV2 (the paper's MobileNetV2 rows); ``width_mult`` is its width multiplier."""
    return MSGCMobileNetV2(grouping, attention, num_classes, width_mult, stem)
