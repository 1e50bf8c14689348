"""Deployers of the backbones: the whole network of one input size as a graph, from the image to the
logits: the stem (a convolution with its BatchNorm folded, an activation, a max-pooling), the blocks'
graphs, and the classifier on the pooled features.

Parts that no gate touches (stems, poolings, the classifier, MobileNetV2's last 1x1) run as the host
network does and count the paper's MACs for them. A deployer is registered for a backbone class and
found through the class hierarchy (:data:`BACKBONE_DEPLOYERS`): a chain of blocks (ResNets, RegNets, a
backbone of your own) deploys with :class:`ChainDeployer`, registered for every :class:`Backbone`.
"""
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..modeling.backbone.base import Backbone
from ..modeling.backbone.condensenet import MSGCDenseNet, transition_macs
from ..modeling.backbone.mobilenetv2 import MSGCMobileNetV2
from .blocks import deploy_block
from .graph import NONE, RELU, RELU6, Buffer, ConvWeights, Graph
from .registry import TypeRegistry

__all__ = ["BACKBONE_DEPLOYERS", "BackboneDeployer", "ChainDeployer", "MobileNetV2Deployer", "DenseNetDeployer"]

BACKBONE_DEPLOYERS = TypeRegistry(
    "backbone", "msgc.deploy.BACKBONE_DEPLOYERS",
    "a BackboneDeployer subclass constructed as entry(backbone) from a backbone in eval mode")


class _Stem:
    """A stem's layers: a convolution, BatchNorm, ReLU(6) and max-pooling, each after the first optional."""

    def __init__(self, layers: List[nn.Module], where: str = "stem"):
        conv, bn, self.act, self.pool = None, None, NONE, None
        for m in layers:
            if isinstance(m, nn.Conv2d) and conv is None:
                conv = m
            elif isinstance(m, nn.BatchNorm2d) and conv is not None and bn is None:
                bn = m
            elif isinstance(m, (nn.ReLU, nn.ReLU6)) and self.act == NONE:
                self.act = RELU if isinstance(m, nn.ReLU) else RELU6
            elif isinstance(m, nn.MaxPool2d) and self.pool is None:
                self.pool = m
            elif not isinstance(m, nn.Identity):
                raise ValueError(f"deploy: {where}: a stem deploys as a convolution, BatchNorm, ReLU(6) and "
                                 f"max-pooling; got a {type(m).__name__}")
        if conv is None:
            raise ValueError(f"deploy: {where}: no convolution in the stem")
        self.weights = ConvWeights(conv, bn, conv.groups, where)
        self.channels = conv.out_channels

    def emit(self, g: Graph, dst: Optional[Buffer] = None) -> Buffer:
        """The stem's ops on the image; ``dst``: where its output goes (no max-pooling then)."""
        g.scope = "stem"
        x = g.conv(g.input, self.weights, act=self.act, dst=dst if self.pool is None else None)
        if self.pool is not None:  # the paper counts 4 MACs per output of the stem's 3x3 max-pooling
            p = self.pool
            k, s, pad = (v if isinstance(v, int) else v[0] for v in (p.kernel_size, p.stride, p.padding))
            x = g.pool(x, k, dst, kind="max", stride=s, padding=pad, macs=4)
        return x


class BackboneDeployer(nn.Module):
    """Base of the backbone deployers: subclasses implement :meth:`graph` (from the image to the logits,
    with the paper's MAC bookkeeping in forward order). Nothing here is a parameter."""

    def graph(self, h: int, w: int) -> Graph:
        """What one sample of an ``h x w`` image computes."""
        raise NotImplementedError  # abstract

    @staticmethod
    def image_graph(h: int, w: int) -> Graph:
        return Graph(h, w, 3)


def _blocks(blocks, names) -> list:
    return [deploy_block(b, n) for b, n in zip(blocks, names)]


def _stem_and_blocks(net, stem: _Stem, blocks: list, h: int, w: int) -> Tuple[Graph, Buffer]:
    """The graph of an ``h x w`` image through ``stem`` and a chain of block deployers."""
    g = BackboneDeployer.image_graph(h, w)
    g.add_macs(net.stem_macs(h, w)[0])
    x = stem.emit(g)
    for blk in blocks:
        g.scope = blk.where
        x = blk.emit(g, x)
    return g, x


def _head(g: Graph, net, x: Buffer, fc: nn.Linear) -> Graph:
    """Global pooling and the classifier on ``x``, with the paper's MACs of the head."""
    g.scope = "head"
    g.head(x, fc)
    g.add_macs(net.head_macs(x.h, x.w))
    return g


def _module_names(net: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in net.named_modules() if name}


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
        names = _module_names(net)
        self.blocks = _blocks(net.blocks(), [names.get(id(b), f"blocks.{i}") for i, b in enumerate(net.blocks())])
        self.fc = [net.fc]

    def graph(self, h, w):
        g, x = _stem_and_blocks(self.net[0], self.stem, self.blocks, h, w)
        return _head(g, self.net[0], x, self.fc[0])


@BACKBONE_DEPLOYERS.register(MSGCMobileNetV2)
class MobileNetV2Deployer(BackboneDeployer):
    """:class:`MSGCMobileNetV2`: a chain, then its last 1x1 before the classifier."""

    def __init__(self, net: MSGCMobileNetV2):
        super().__init__()
        self.net = [net]
        self.stem = _Stem(list(net.stem))
        self.blocks = _blocks(net.blocks(), [f"features.{i}" for i in range(1, len(net.blocks()) + 1)])
        self.last = ConvWeights(net.last_conv[0], net.last_conv[1], 1, "last_conv")
        self.fc = [net.fc]

    def graph(self, h, w):
        net = self.net[0]
        g, x = _stem_and_blocks(net, self.stem, self.blocks, h, w)
        g.scope = "last_conv"
        g.add_macs(net.last_macs(x.h, x.w))
        x = g.conv(x, self.last, act=RELU6)
        return _head(g, net, x, self.fc[0])


@BACKBONE_DEPLOYERS.register(MSGCDenseNet)
class DenseNetDeployer(BackboneDeployer):
    """:class:`MSGCDenseNet`: each stage is one buffer of its final width; a layer reads its first
    columns and writes its new channels after them (no concatenation copies). The stem and each
    transition write a stage's first columns."""

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
        self.fc = [net.classifier]

    def graph(self, h, w):
        net = self.net[0]
        g = self.image_graph(h, w)
        stem, sh, sw = net.stem_macs(h, w)
        g.add_macs(stem)
        c = net.stage_channels["stem"]
        stage = g.buffer(sh, sw, self.widths[0])
        self.stem.emit(g, dst=g.view(stage, 0, c))
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
        x = g.affine(stage, self.final_norm[0], RELU, macs=1)  # the head's final ReLU, as the paper counts it
        return _head(g, net, x, self.fc[0])


def deploy_backbone(backbone: nn.Module) -> BackboneDeployer:
    """The deployer of ``backbone`` (found through its class hierarchy)."""
    return BACKBONE_DEPLOYERS.get(backbone)(backbone)
