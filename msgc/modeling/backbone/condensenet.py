"""The CondenseNet row's host: DenseNet-74 with MSGC dense layers (pre-activation, average-pool transitions).

Stages 4, 6, 8, 10, 8 layers with growth 8, 16, 32, 64, 128, bottleneck 4, and a 3x3 stem with stride 2
(stride 1 for the "cifar" stem). Key layout follows the original MSGC release.
"""
import math
from collections import OrderedDict

import torch
from torch import nn

from ...utils.errors import InvalidValueError
from ..layers import AttentionGenerator
from ..macs import Costs, conv_out
from .base import Backbone, GatedBlock
from .build import BACKBONE_REGISTRY

__all__ = ["MSGCDenseNet", "DenseLayer", "transition_macs"]


class _PreActConv(nn.Sequential):
    def __init__(self, cin, cout, kernel=1, padding=0, groups=1):
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(cin))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(cin * groups, cout, kernel, 1, padding, groups=groups, bias=False))


class DenseLayer(GatedBlock):
    """BN-ReLU-1x1 (input gated by a single-head mask), BN-ReLU-3x3 MSGC convolution; output concatenated."""

    def __init__(self, in_channels, growth, bottleneck, grouping, attention, name=""):
        super().__init__()
        heads = grouping.heads
        if growth % heads:
            raise InvalidValueError(f"{name}: MODEL.MSGC.HEADS={heads} does not divide its growth rate {growth}")
        hidden = bottleneck * growth
        self.in_channels, self.growth, self.hidden, self.heads = in_channels, growth, hidden, heads
        self.conv_1 = _PreActConv(in_channels, hidden)
        self.conv_2 = _PreActConv(hidden, growth, 3, 1, groups=heads)
        reduction = 8 if in_channels >= 200 else 4
        self.maskgen1 = grouping.channel_mask(in_channels, in_channels, reduction)
        self.maskgen2 = grouping.head_mask(in_channels, hidden, reduction)
        self.attgen2 = attention(in_channels, hidden, heads, reduction)
        # the reference counts the context pooling of its dense layers wherever a gate module exists
        k = self.describe(in_channels, name, context_cost="modules")
        x = k.input
        y = k.affine(x, self.conv_1.norm, "relu", cost=1, name="conv_1.norm")  # the paper counts the first ReLU
        k.context(y)
        g1 = k.channel_gate(self.maskgen1, channels=in_channels)
        g2 = k.head_gate(self.maskgen2, self.attgen2, channels=hidden, heads=heads)
        y = k.conv(y, self.conv_1.conv, gate=g1, name="conv_1")
        y = k.conv(y, self.conv_2.conv, gate=g2, pre=self.conv_2.norm, pre_act="relu", name="conv_2")
        k.output(k.concat(x, y))


class _Stage(nn.Sequential):
    """Dense layers of one stage (``denselayer_1`` ...); passes (x, macs) through."""


def transition_macs(channels: int, h: int, w: int) -> int:
    """MACs of a transition's 2x2 average pooling to an h x w map, as the reference counts them."""
    return 4 * channels * h * w


class _Transition(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x_macs):
        x, macs = x_macs
        x = self.pool(x)
        return x, macs + transition_macs(x.size(1), x.size(2), x.size(3))


class MSGCDenseNet(Backbone):
    """DenseNet with MSGC dense layers. Stages: ``stem``, ``dense1`` ... ``dense5`` (after each block)."""

    def __init__(self, grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet",
                 stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), bottleneck=4):
        super().__init__(grouping.heads)
        if stem not in ("imagenet", "cifar"):
            raise InvalidValueError(f"MODEL.BACKBONE.STEM must be 'imagenet' or 'cifar', got '{stem}'")
        self.build_args = dict(num_classes=num_classes, width_mult=width_mult, stem=stem, stages=stages, growth=growth,
                               bottleneck=bottleneck)
        growth = [max(grouping.heads, int(round(g * width_mult))) for g in growth]
        self.init_stride = 2 if stem == "imagenet" else 1
        channels = 2 * growth[0]
        self.features = nn.Sequential()
        self.features.add_module("init_conv", nn.Conv2d(3, channels, 3, self.init_stride, 1, bias=False))
        self.stage_channels, self.stage_strides = {"stem": channels}, {"stem": self.init_stride}
        stride = self.init_stride
        for i, (n, g) in enumerate(zip(stages, growth)):
            stage = _Stage()
            for j in range(n):
                stage.add_module(f"denselayer_{j + 1}", DenseLayer(
                    channels + j * g, g, bottleneck, grouping, attention,
                    f"features.denseblock_{i + 1}.denselayer_{j + 1}"))
            self.features.add_module(f"denseblock_{i + 1}", stage)
            channels += n * g
            self.stage_channels[f"dense{i + 1}"], self.stage_strides[f"dense{i + 1}"] = channels, stride
            if i != len(stages) - 1:
                self.features.add_module(f"transition_{i + 1}", _Transition())
                stride *= 2
        self.features_last = nn.Sequential(OrderedDict(
            norm_last=nn.BatchNorm2d(channels), relu_last=nn.ReLU(inplace=True)))
        self.num_features, self.num_classes = channels, num_classes
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AttentionGenerator):
                m.reset_output()

    def stem_macs(self, h, w):
        """(MACs of the stem on an h x w image, its output h, w)."""
        h, w = conv_out(h, 3, 1, self.init_stride), conv_out(w, 3, 1, self.init_stride)
        return 27 * self.stage_channels["stem"] * h * w, h, w

    @property
    def stem(self) -> nn.Conv2d:
        return self.features.init_conv

    def stages(self):
        """The dense layers of each stage, in order (a transition, 2x2 average pooling, between two)."""
        return [list(m) for name, m in self.features.named_children() if name.startswith("denseblock")]

    @property
    def final_norm(self) -> nn.BatchNorm2d:
        """The BatchNorm (then ReLU) after the last stage."""
        return self.features_last.norm_last

    def head_macs(self, h, w):
        # final ReLU and average pooling, then the classifier
        return 2 * h * w * self.num_features + self.num_features * self.num_classes

    def complexity(self, h, w):
        main, h, w = self.stem_macs(h, w)
        total = Costs(main=main)
        for name, module in self.features.named_children():
            if name.startswith("denseblock"):
                for layer in module:
                    c, h, w = layer.costs(h, w)
                    total = total + c
                channels = layer.in_channels + layer.growth
            elif name.startswith("transition"):
                h, w = conv_out(h, 2, 0, 2), conv_out(w, 2, 0, 2)
                total = total + Costs(main=transition_macs(channels, h, w))
        return total + Costs(main=self.head_macs(h, w))

    def forward_features(self, x):
        macs = x.new_full((x.size(0),), float(self.stem_macs(x.size(2), x.size(3))[0]), dtype=torch.float64)
        x = self.features.init_conv(x)
        feats = OrderedDict(stem=x)
        state = (x, macs)
        for name, module in list(self.features.named_children())[1:]:
            state = module(state)
            if name.startswith("denseblock"):
                feats[name.replace("denseblock_", "dense")] = state[0]
        last = next(reversed(feats))
        feats[last] = self.features_last(feats[last])
        return feats, state[1]

    def forward_head(self, features):
        x = features[next(reversed(features))]
        return self.classifier(x.mean((2, 3)))


@BACKBONE_REGISTRY.register("msgc_condensenet")
def msgc_condensenet(grouping, attention, num_classes=1000, width_mult=1.0, stem="imagenet"):
    """MSGC DenseNet-74, the host of the paper's CondenseNet rows (``width_mult`` scales the growth)."""
    return MSGCDenseNet(grouping, attention, num_classes, width_mult, stem)
