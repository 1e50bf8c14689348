"""Deployed backbones: the stems and heads around the deployed blocks, registered by source class.

Parts that no gate touches (stems, pooling, classifier heads, MobileNetV2's last 1x1) run as in the
host network, BatchNorm folded, and are counted as the paper counts them.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..modeling.backbone.condensenet import DenseLayer, MSGCDenseNet
from ..modeling.backbone.mobilenetv2 import MSGCMobileNetV2
from ..modeling.backbone.resnet import BasicBlock, Bottleneck, MSGCResNet
from .blocks import DeployedBasicBlock, DeployedBottleneck, DeployedDenseLayer, DeployedInvertedResidual
from .build import DEPLOY_REGISTRY
from .ops import FoldedConv, PreActivation, to_image, to_matrix

__all__ = ["DeployedResNet", "DeployedMobileNetV2", "DeployedDenseNet"]


class _Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().float().t().contiguous(), persistent=False)
        self.register_buffer("bias", linear.bias.detach().float().clone(), persistent=False)

    def forward(self, features):
        """HW x C features -> 1 x classes logits (global average pooling, then the linear layer)."""
        return torch.addmm(self.bias, features.mean(0, keepdim=True), self.weight)


def _image(x):
    """A 1 x 3 x H x W image -> its HW x 3 matrix (channels-last)."""
    return to_matrix(x.contiguous(memory_format=torch.channels_last))


@DEPLOY_REGISTRY.register("MSGCResNet")
class DeployedResNet(nn.Module):
    """Deployed :class:`MSGCResNet` (basic and bottleneck blocks)."""

    def __init__(self, net: MSGCResNet, native: bool = False):
        super().__init__()
        self.stem = FoldedConv(net.conv1, net.bn1)
        self.maxpool = not isinstance(net.maxpool, nn.Identity)
        blocks = []
        for i in range(1, 5):
            for j, blk in enumerate(getattr(net, f"layer{i}")):
                kind = DeployedBasicBlock if isinstance(blk, BasicBlock) else DeployedBottleneck
                if not isinstance(blk, (BasicBlock, Bottleneck)):
                    raise ValueError(f"deploy: layer{i}.{j} is a {type(blk).__name__}, not a ResNet block")
                blocks.append(kind(blk, f"layer{i}.{j}", native))
        self.blocks = nn.ModuleList(blocks)
        self.fc = _Linear(net.fc)
        self.stem_costs, self.head_macs = net._stem_costs, net.head_macs

    def forward_sample(self, image):
        """One 1 x 3 x H x W image -> (1 x classes logits, paper MACs, executed MACs)."""
        stem = self.stem_costs(image.size(2), image.size(3))[0]
        macs = float(stem)
        x, h, w, _ = self.stem(_image(image), image.size(2), image.size(3))
        x.relu_()
        if self.maxpool:
            x = to_matrix(F.max_pool2d(to_image(x, h, w), 3, 2, 1))
            h, w = (h + 1) // 2, (w + 1) // 2
        executed = stem
        for blk in self.blocks:
            x, h, w, macs, executed = blk(x, h, w, macs, executed)
        head = self.head_macs(h, w)
        return self.fc(x), macs + head, executed + head


@DEPLOY_REGISTRY.register("MSGCMobileNetV2")
class DeployedMobileNetV2(nn.Module):
    """Deployed :class:`MSGCMobileNetV2`."""

    def __init__(self, net: MSGCMobileNetV2, native: bool = False):
        super().__init__()
        first, last = net.features[0], net.features[-1]
        self.stem = FoldedConv(first[0], first[1])
        self.blocks = nn.ModuleList(DeployedInvertedResidual(b, f"features.{i}", native)
                                    for i, b in enumerate(net.features[1:-1], start=1))
        self.last = FoldedConv(last[0], last[1])
        self.fc = _Linear(net.classifier[-1])
        self.stem_macs, self.last_macs, self.head_macs = net._stem_macs, net._last_macs, net.head_macs

    def forward_sample(self, image):
        stem = self.stem_macs(image.size(2), image.size(3))[0]
        macs = float(stem)
        x, h, w, _ = self.stem(_image(image), image.size(2), image.size(3))
        x.clamp_(0, 6)
        executed = stem
        for blk in self.blocks:
            x, h, w, macs, executed = blk(x, h, w, macs, executed)
        last = self.last_macs(h, w)
        x, h, w, _ = self.last(x, h, w)
        x.clamp_(0, 6)
        head = self.head_macs(h, w)
        return self.fc(x), (macs + last) + head, executed + last + head


@DEPLOY_REGISTRY.register("MSGCDenseNet")
class DeployedDenseNet(nn.Module):
    """Deployed :class:`MSGCDenseNet`: each stage writes its layers' outputs into one preallocated
    channels-last buffer, so no layer copies its input (the host's concatenations)."""

    def __init__(self, net: MSGCDenseNet, native: bool = False):
        super().__init__()
        self.stem = FoldedConv(net.features.init_conv)
        stages, self.widths = [], []
        for name, module in net.features.named_children():
            if name.startswith("denseblock"):
                for j, layer in enumerate(module):
                    if not isinstance(layer, DenseLayer):
                        raise ValueError(f"deploy: {name}.{j} is a {type(layer).__name__}, not a DenseLayer")
                stages.append(nn.ModuleList(DeployedDenseLayer(l, f"features.{name}.{j}", native)
                                            for j, l in enumerate(module)))
                self.widths.append(net.stage_channels[name.replace("denseblock_", "dense")])
        self.stages = nn.ModuleList(stages)
        self.last_norm = PreActivation(net.features_last.norm_last)
        self.fc = _Linear(net.classifier)
        self.stem_macs, self.head_macs = net._stem_macs, net.head_macs

    def forward_sample(self, image):
        stem = self.stem_macs(image.size(2), image.size(3))[0]
        macs = float(stem)
        x, h, w, _ = self.stem(_image(image), image.size(2), image.size(3))
        executed = stem
        for i, (stage, width) in enumerate(zip(self.stages, self.widths)):
            if i:
                x = to_matrix(F.avg_pool2d(to_image(x, h, w), 2, 2))
                h, w = h // 2, w // 2
                pool = 4 * x.numel()
                macs, executed = macs + pool, executed + pool
            buf = x.new_empty(x.size(0), width)
            c = x.size(1)
            buf[:, :c] = x
            for layer in stage:
                out, h, w, macs, executed = layer(buf[:, :c], h, w, macs, executed)
                buf[:, c:c + out.size(1)] = out
                c += out.size(1)
            x = buf
        x = self.last_norm(x)
        head = self.head_macs(h, w)
        return self.fc(x), macs + head, executed + head
