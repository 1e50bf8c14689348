"""Deployers of the backbones: the stem (PyTorch's oneDNN kernels, BatchNorm folded, batched), the
graph of the blocks for an input size, and the classifier.

Parts that no gate touches (stems, poolings, the classifier, MobileNetV2's last 1x1) run as in the host
network and count the paper's MACs for them. A deployer is registered for a backbone class and found
through the class hierarchy (:data:`BACKBONE_DEPLOYERS`): a subclass of ``MSGCResNet`` deploys as one.
"""
from typing import Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..modeling.backbone.condensenet import MSGCDenseNet, transition_macs
from ..modeling.backbone.mobilenetv2 import MSGCMobileNetV2
from ..modeling.backbone.base import Backbone
from .blocks import deploy_block
from .fold import fold_bn, to_matrix
from .graph import NONE, RELU, RELU6, ConvWeights, Graph
from .registry import TypeRegistry

__all__ = ["BACKBONE_DEPLOYERS", "BackboneDeployer", "ChainDeployer", "MobileNetV2Deployer", "DenseNetDeployer"]

BACKBONE_DEPLOYERS = TypeRegistry(
    "backbone", "msgc.deploy.BACKBONE_DEPLOYERS",
    "a BackboneDeployer subclass constructed as entry(backbone) from a backbone in eval mode")


class _Stem(nn.Module):
    """A convolution (BatchNorm folded), then an activation and a max-pooling, each optional: the
    layers of a backbone's stem, run by PyTorch (oneDNN) on the batch."""

    def __init__(self, layers: List[nn.Module], where: str = "stem"):
        super().__init__()
        conv, bn, self.act, self.pool = None, None, NONE, None
        for m in layers:
            if isinstance(m, nn.Conv2d) and conv is None:
                conv = m
            elif isinstance(m, nn.BatchNorm2d) and conv is not None and bn is None:
                bn = m
            elif isinstance(m, (nn.ReLU, nn.ReLU6)) and self.act == NONE:
                self.act = RELU if isinstance(m, nn.ReLU) else RELU6
            elif isinstance(m, nn.MaxPool2d) and self.pool is None:
                self.pool = (m.kernel_size, m.stride, m.padding)
            elif not isinstance(m, nn.Identity):
                raise ValueError(f"deploy: {where}: a stem deploys as a convolution, BatchNorm, ReLU(6) and max-pooling; "
                                 f"got a {type(m).__name__}")
        if conv is None:
            raise ValueError(f"deploy: {where}: no convolution in the stem")
        weight, bias = fold_bn(conv.weight, bn)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.stride, self.padding, self.groups = conv.stride, conv.padding, conv.groups

    def forward(self, images):
        x = F.conv2d(images.contiguous(memory_format=torch.channels_last), self.weight, self.bias, self.stride,
                     self.padding, 1, self.groups)
        x = x.relu_() if self.act == RELU else x.clamp_(0, 6) if self.act == RELU6 else x
        return x if self.pool is None else F.max_pool2d(x, *self.pool)


class BackboneDeployer(nn.Module):
    """Base of the backbone deployers.

    Subclasses set ``self.stem`` (a module: images ``N x 3 x H x W`` -> ``N x C x h x w``), call
    :meth:`set_classifier` and implement :meth:`stem_macs`, :meth:`graph` and :meth:`head_macs`.
    """

    def set_classifier(self, fc: nn.Linear) -> None:
        """The linear classifier on the pooled features (copied: a deployed model has no parameters)."""
        self.register_buffer("fc_weight", fc.weight.detach().float().t().contiguous(), persistent=False)
        self.register_buffer("fc_bias", fc.bias.detach().float().clone(), persistent=False)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """``N x C`` pooled features -> ``N x classes`` logits."""
        return torch.addmm(self.fc_bias, features, self.fc_weight)

    def program_input(self, images: torch.Tensor) -> torch.Tensor:
        """The stem's output as the graph's input: ``N x h x w x C`` (contiguous)."""
        return to_matrix(self.stem(images))

    def stem_macs(self, h: int, w: int) -> Tuple[int, int, int]:
        """(the stem's MACs as the paper counts them, output h, output w)."""
        raise NotImplementedError  # abstract

    def graph(self, h: int, w: int) -> Graph:
        """What a sample of an ``h x w`` image computes after the stem."""
        raise NotImplementedError  # abstract

    def head_macs(self, h: int, w: int) -> int:
        raise NotImplementedError  # abstract


def _blocks(blocks, names) -> list:
    return [deploy_block(b, n) for b, n in zip(blocks, names)]


@BACKBONE_DEPLOYERS.register(Backbone)
class ChainDeployer(BackboneDeployer):
    """Any backbone that is a stem, a chain of gated blocks, global pooling and a linear classifier
    (ResNets, RegNets, a backbone of your own): it needs ``stem_layers()`` (the stem's modules in
    order), ``blocks()``, ``fc``, ``stem_macs(h, w)`` and ``head_macs(h, w)``."""

    def __init__(self, net: Backbone):
        super().__init__()
        needs = [a for a in ("stem_layers", "blocks", "fc", "stem_macs", "head_macs") if not hasattr(net, a)]
        if needs:
            t = type(net)
            raise ValueError(f"deploy: no deployer for the backbone {t.__module__}.{t.__qualname__}: a chain of blocks "
                             f"deploys with stem_layers(), blocks(), fc, stem_macs() and head_macs(), and it lacks "
                             f"{', '.join(needs)}; or register one with "
                             f"@msgc.deploy.BACKBONE_DEPLOYERS.register({t.__name__})")
        self.net = [net]  # not a submodule: the MAC functions only
        self.stem = _Stem(net.stem_layers())
        names = _block_names(net)
        self.blocks = _blocks(net.blocks(), [names.get(id(b), f"blocks.{i}") for i, b in enumerate(net.blocks())])
        self.stem_channels = self.stem.weight.size(0)
        self.set_classifier(net.fc)

    def stem_macs(self, h, w):
        return self.net[0].stem_macs(h, w)

    def head_macs(self, h, w):
        return self.net[0].head_macs(h, w)

    def graph(self, h, w):
        stem, h, w = self.stem_macs(h, w)
        g = Graph(h, w, self.stem_channels)
        g.add_macs(stem)
        x = g.input
        for blk in self.blocks:
            g.scope = blk.where
            x = blk.emit(g, x)
        g.scope = "head"
        g.gap(x)
        g.add_macs(self.head_macs(x.h, x.w))
        return g


def _block_names(net: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in net.named_modules() if name}


@BACKBONE_DEPLOYERS.register(MSGCMobileNetV2)
class MobileNetV2Deployer(BackboneDeployer):
    """:class:`MSGCMobileNetV2`."""

    def __init__(self, net: MSGCMobileNetV2):
        super().__init__()
        self.net = [net]
        self.stem = _Stem(list(net.stem))
        self.blocks = _blocks(net.blocks(), [f"features.{i}" for i in range(1, len(net.blocks()) + 1)])
        self.last = ConvWeights(net.last_conv[0], net.last_conv[1], 1, "last_conv")
        self.set_classifier(net.fc)

    def stem_macs(self, h, w):
        return self.net[0].stem_macs(h, w)

    def head_macs(self, h, w):
        return self.net[0].head_macs(h, w)

    def graph(self, h, w):
        stem, h, w = self.stem_macs(h, w)
        g = Graph(h, w, self.net[0].stage_channels["stem"])
        g.add_macs(stem)
        x = g.input
        for blk in self.blocks:
            g.scope = blk.where
            x = blk.emit(g, x)
        g.scope = "last_conv"
        g.add_macs(self.net[0].last_macs(x.h, x.w))
        x = g.conv(x, self.last, act=RELU6)
        g.gap(x)
        g.add_macs(self.head_macs(x.h, x.w))
        return g


@BACKBONE_DEPLOYERS.register(MSGCDenseNet)
class DenseNetDeployer(BackboneDeployer):
    """:class:`MSGCDenseNet`: each stage is one buffer of its final width; a layer reads its first
    columns and writes its new channels after them (no concatenation copies). The stem writes the first
    stage's first columns."""

    def __init__(self, net: MSGCDenseNet):
        super().__init__()
        self.net = [net]
        self.stem = _Stem([net.stem])
        self.stages: List[list] = []
        for i, layers in enumerate(net.stages()):
            names = [f"features.denseblock_{i + 1}.denselayer_{j + 1}" for j in range(len(layers))]
            self.stages.append(_blocks(layers, names))
        self.widths = [layers[-1].in_channels + layers[-1].growth for layers in net.stages()]
        self.final_norm = [net.final_norm]  # not a submodule: folded when the graph is made
        self.set_classifier(net.classifier)

    def program_input(self, images):
        x = self.stem(images)
        out = x.new_empty(x.size(0), x.size(2), x.size(3), self.widths[0])
        out[..., :x.size(1)] = x.permute(0, 2, 3, 1)
        return out

    def stem_macs(self, h, w):
        return self.net[0].stem_macs(h, w)

    def head_macs(self, h, w):
        return self.net[0].head_macs(h, w)

    def graph(self, h, w):
        stem, h, w = self.stem_macs(h, w)
        g = Graph(h, w, self.widths[0])
        g.add_macs(stem)
        stage, c = g.input, self.net[0].stage_channels["stem"]
        for i, (layers, width) in enumerate(zip(self.stages, self.widths)):
            if i:
                g.scope = f"features.transition_{i}"
                nxt = g.buffer(stage.h // 2, stage.w // 2, width)
                g.pool(stage, 2, dst=g.view(nxt, 0, c))
                g.add_macs(transition_macs(c, nxt.h, nxt.w))
                stage = nxt
            for layer in layers:
                g.scope = layer.where
                growth = layer.block.growth
                layer.emit(g, g.view(stage, 0, c), out=g.view(stage, c, growth))
                c += growth
        g.scope = "head"
        x = g.affine(stage, self.final_norm[0], RELU)
        g.gap(x)
        g.add_macs(self.head_macs(x.h, x.w))
        return g


def deploy_backbone(backbone: nn.Module) -> BackboneDeployer:
    """The deployer of ``backbone`` (found through its class hierarchy)."""
    return BACKBONE_DEPLOYERS.get(backbone)(backbone)
