"""Deployers of the gated blocks: each folds a block's weights once and, per input size, describes in
a :class:`~.graph.Graph` what one sample computes, so that only what the gates keep is computed:

- closed input channels are never read (each gated convolution reads its set's open channels);
- output channels that nothing reads are not computed (the paper's bonus): a convolution feeding an
  MSGC convolution computes the union of its heads' channels; a bottleneck's conv2 computes only the
  channels conv3's mask keeps;
- BatchNorm is folded into the convolution before it, attention into the gathered weights or inputs.

A block's paper MACs are its own ``sample_macs`` (the model's function) on the sets' counts.

Deployers are found through the block's class hierarchy (:data:`BLOCK_DEPLOYERS`), so a subclass of a
block deploys as its base unless it registers its own.
"""
from typing import Dict, Optional

from torch import nn

from ..modeling.backbone.condensenet import DenseLayer
from ..modeling.backbone.mobilenetv2 import InvertedResidual
from ..modeling.backbone.resnet import BasicBlock, Bottleneck
from ..modeling.grouping import StaticMask
from ..modeling.layers import AttentionGenerator, MaskGenerator
from .fold import FoldedGenerators
from .graph import ALL, GROUPS, NONE, RELU, RELU6, UNION, Buffer, ConvWeights, Graph, IndexSet
from .registry import TypeRegistry

__all__ = ["BLOCK_DEPLOYERS", "GateSources", "BasicBlockDeployer", "BottleneckDeployer",
           "InvertedResidualDeployer", "DenseLayerDeployer"]

BLOCK_DEPLOYERS = TypeRegistry("block", "msgc.deploy.BLOCK_DEPLOYERS",
                               "a class with __init__(block, where) and emit(graph, x) -> output buffer")


class GateSources:
    """A block's masks and attentions, by name: generators (evaluated together on the block's
    context), static masks (constants) or None."""

    def __init__(self, where: str, **modules: Optional[nn.Module]):
        self.where, self.static, self.index = where, {}, {}
        generators = []
        for name, module in modules.items():
            if module is None:
                continue
            if isinstance(module, StaticMask):  # as logits: +1 where open, -1 where closed
                self.static[name] = (module.mask.detach().float() * 2 - 1).contiguous()
            elif isinstance(module, (MaskGenerator, AttentionGenerator)):
                self.index[name] = len(generators)
                generators.append(module)
            else:
                raise ValueError(
                    f"deploy: {where}.{name} is a {type(module).__name__}; deploy supports MaskGenerator, "
                    "StaticMask and AttentionGenerator (groupings msgc, prune, static, dense; attention none, "
                    "channel)")
        self.generators = FoldedGenerators(generators) if generators else None
        self._logits: Dict[str, object] = {}

    @property
    def needs_context(self) -> bool:
        return self.generators is not None

    def emit(self, g: Graph, x: Buffer) -> None:
        """The generators' op on ``x`` (the block's input, whose mean is the context)."""
        self._logits = {}
        if self.generators is not None:
            outs = g.gates(x, self.generators)
            self._logits = {name: outs[i] for name, i in self.index.items()}

    def sets(self, g: Graph, mask: Optional[str], att: Optional[str], heads: int, channels: int,
             groups: int = 0) -> Optional[IndexSet]:
        """The index sets of the mask named ``mask`` with the attention named ``att`` (after :meth:`emit`)."""
        return g.index_set(heads, channels, logits=self._logits.get(mask), const=self.static.get(mask),
                           att=self._logits.get(att), groups=groups)


def _shortcut(block, where) -> Optional[ConvWeights]:
    sc = block.shortcut
    return None if sc is None else ConvWeights(sc[0], sc[1], 1, f"{where}.downsample")


@BLOCK_DEPLOYERS.register(BasicBlock)
class BasicBlockDeployer:
    """ResNet basic block: conv1 reads its mask's open inputs and computes the channels some head of
    conv2 reads; each head of conv2 reads its open channels; the shortcut is added in conv2's stores."""

    def __init__(self, block: BasicBlock, where: str):
        self.where = where
        self.block, self.heads, self.planes, self.inplanes = block, block.heads, block.planes, block.inplanes
        self.gates = GateSources(where, maskgen1=block.maskgen1, maskgen2=block.maskgen2, attgen1=block.attgen1,
                                 attgen2=block.attgen2)
        self.conv1 = ConvWeights(block.conv1, block.bn1, 1, f"{where}.conv1")
        self.conv2 = ConvWeights(block.conv2, block.bn2, block.heads, f"{where}.conv2")
        self.downsample = _shortcut(block, where)

    def emit(self, g: Graph, x: Buffer) -> Buffer:
        self.gates.emit(g, x)
        s1 = self.gates.sets(g, "maskgen1", "attgen1", 1, self.inplanes)
        s2 = self.gates.sets(g, "maskgen2", "attgen2", self.heads, self.planes)
        y = g.conv(x, self.conv1, s1, att=self.block.attgen1 is not None, outputs=(UNION, s2), act=RELU)
        identity = x if self.downsample is None else g.conv(x, self.downsample)
        out = g.conv(y, self.conv2, s2, att=self.block.attgen2 is not None, act=RELU, res=identity)
        g.add_block_macs(self.block.sample_macs, x.h, x.w, [s1, s2])
        return out


@BLOCK_DEPLOYERS.register(Bottleneck)
class BottleneckDeployer:
    """ResNet bottleneck: conv1 (open inputs -> channels some head reads), conv2 per head computing only
    the outputs conv3's mask keeps (the second bonus), conv3 reading exactly those."""

    def __init__(self, block: Bottleneck, where: str):
        self.where = where
        self.block, self.heads, self.width, self.inplanes = block, block.heads, block.width, block.inplanes
        self.gates = GateSources(where, maskgen1=block.maskgen1, maskgen2=block.maskgen2, maskgen3=block.maskgen3,
                                 attgen2=block.attgen2)
        self.conv1 = ConvWeights(block.conv1, block.bn1, 1, f"{where}.conv1")
        self.conv2 = ConvWeights(block.conv2, block.bn2, block.heads, f"{where}.conv2")
        self.conv3 = ConvWeights(block.conv3, block.bn3, 1, f"{where}.conv3")
        self.downsample = _shortcut(block, where)

    def emit(self, g: Graph, x: Buffer) -> Buffer:
        self.gates.emit(g, x)
        s1 = self.gates.sets(g, "maskgen1", None, 1, self.inplanes)
        s2 = self.gates.sets(g, "maskgen2", "attgen2", self.heads, self.width)
        s3 = self.gates.sets(g, "maskgen3", None, 1, self.width, groups=self.heads)
        y = g.conv(x, self.conv1, s1, outputs=(UNION, s2), act=RELU)
        y = g.conv(y, self.conv2, s2, att=self.block.attgen2 is not None, outputs=(GROUPS, s3), act=RELU)
        identity = x if self.downsample is None else g.conv(x, self.downsample)
        out = g.conv(y, self.conv3, s3, act=RELU, res=identity)
        g.add_block_macs(self.block.sample_macs, x.h, x.w, [s1, s2, s3])
        return out


@BLOCK_DEPLOYERS.register(InvertedResidual)
class InvertedResidualDeployer:
    """MobileNetV2 block: the expansion and the depthwise convolution only on the hidden channels some
    head of the projection reads (the bonus); each projection head reads its open channels."""

    def __init__(self, block: InvertedResidual, where: str):
        self.where = where
        self.block, self.heads, self.hidden = block, block.heads, block.hidden
        self.gates = GateSources(where, maskgen=block.maskgen, attgen=block.attgen)
        ex = block.expansion
        self.expand = None if ex is None else ConvWeights(ex[0], ex[1], 1, f"{where}.expansion")
        dw = block.depthwise
        self.dw = ConvWeights(dw[0], dw[1], dw[0].groups, f"{where}.depthwise")
        project, bn = block.project
        self.project = ConvWeights(project, bn, block.heads, f"{where}.project")
        self.residual = block.use_res_connect

    def emit(self, g: Graph, x: Buffer) -> Buffer:
        self.gates.emit(g, x)
        s = self.gates.sets(g, "maskgen", "attgen", self.heads, self.hidden)
        y = x if self.expand is None else g.conv(x, self.expand, outputs=(UNION, s), act=RELU6)
        y = g.depthwise(y, self.dw, s, act=RELU6)
        out = g.conv(y, self.project, s, att=self.block.attgen is not None, act=NONE,
                     res=x if self.residual else None)
        g.add_block_macs(self.block.sample_macs, x.h, x.w, [s])
        return out


@BLOCK_DEPLOYERS.register(DenseLayer)
class DenseLayerDeployer:
    """DenseNet layer: pre-activation of the input, conv_1 from the open inputs to the channels some head
    reads (conv_2's BatchNorm folded into it), conv_2 per head, written into the stage's next columns."""

    def __init__(self, layer: DenseLayer, where: str):
        self.where = where
        self.layer, self.heads, self.hidden, self.growth = layer, layer.heads, layer.hidden, layer.growth
        self.gates = GateSources(where, maskgen1=layer.maskgen1, maskgen2=layer.maskgen2, attgen2=layer.attgen2)
        self.norm = layer.conv_1.norm
        self.conv1 = ConvWeights(layer.conv_1.conv, layer.conv_2.norm, 1, f"{where}.conv_1")
        self.conv2 = ConvWeights(layer.conv_2.conv, None, layer.heads, f"{where}.conv_2")

    def emit(self, g: Graph, x: Buffer, out: Optional[Buffer] = None) -> Buffer:
        """``x``: the stage's first columns; ``out``: where the new channels go (a view after them)."""
        y = g.affine(x, self.norm, RELU, macs=1)  # the first ReLU counts one MAC per element, as the paper's
        self.gates.emit(g, y)
        s1 = self.gates.sets(g, "maskgen1", None, 1, x.cols)
        s2 = self.gates.sets(g, "maskgen2", "attgen2", self.heads, self.hidden)
        z = g.conv(y, self.conv1, s1, outputs=(UNION, s2), act=RELU)
        new = g.conv(z, self.conv2, s2, att=self.layer.attgen2 is not None, act=NONE, dst=out)
        g.add_block_macs(self.layer.sample_macs, x.h, x.w, [s1, s2])
        return new


def deploy_block(block: nn.Module, where: str):
    """The deployer of ``block`` (found through its class hierarchy)."""
    return BLOCK_DEPLOYERS.get(block)(block, where)
