"""Deployment of gated blocks from their kit description (:mod:`msgc.modeling.kit`): weights folded once,
and per input size the ops of one sample, so that only what the gates keep is computed:

- closed input channels are never read (each gated convolution reads its set's open channels);
- output channels that nothing reads are not computed (the paper's bonus): where a value flows, through
  depthwise convolutions only, into one gated convolution, its producers compute the channels that
  convolution reads (the union of its heads; for a multi-head producer, each head's open channels of
  the next one-head gate);
- BatchNorm is folded into the convolution before it (a pre-activation into the convolution that makes
  its input), attention into the gathered weights or inputs, a residual addition into the stores of the
  convolution it follows.

A block's paper MACs are its own ``sample_macs`` on the sets' counts. Any :class:`GatedBlock` with a
description deploys here; another block class needs a deployer registered for it
(:data:`BLOCK_DEPLOYERS`, found through the class hierarchy).
"""
from typing import Dict, List, Optional, Tuple

from torch import nn

from ..modeling.backbone.base import GatedBlock
from ..modeling.grouping import StaticMask
from ..modeling.kit import AddNode, AffineNode, ConcatNode, ConvNode, Gate, SENode
from ..modeling.layers import AttentionGenerator, MaskGenerator
from .fold import FoldedGenerators
from .graph import ALL, GROUPS, NONE, RELU, RELU6, UNION, Buffer, ConvWeights, Graph, IndexSet
from .registry import TypeRegistry

__all__ = ["BLOCK_DEPLOYERS", "GateSources", "KitDeployer", "deploy_block"]

BLOCK_DEPLOYERS = TypeRegistry("block", "msgc.deploy.BLOCK_DEPLOYERS",
                               "a class with __init__(block, where) and emit(graph, x, out=None) -> the block's output "
                               "buffer; or describe the block with the kit (GatedBlock.describe)")

_ACT = {None: NONE, "relu": RELU, "relu6": RELU6}


class GateSources:
    """A block's masks and attentions, by name: generators (evaluated together on the block's context),
    static masks (constants) or None."""

    def __init__(self, where: str, modules: List[Tuple[str, Optional[nn.Module]]]):
        self.where, self.static, self.index = where, {}, {}
        generators = []
        for name, module in modules:
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
        self.generators = FoldedGenerators.of(generators) if generators else None
        self._logits: Dict[str, object] = {}

    def emit(self, g: Graph, x: Buffer) -> None:
        """The generators' op on ``x`` (whose mean is the context)."""
        self._logits = {}
        if self.generators is not None:
            outs = g.gates(x, self.generators)
            self._logits = {name: outs[i] for name, i in self.index.items()}

    def sets(self, g: Graph, mask: Optional[str], att: Optional[str], heads: int, channels: int,
             groups: int = 0, host_groups: int = 1, scale: Optional[object] = None) -> Optional[IndexSet]:
        """The index sets of the mask named ``mask`` with the attention named ``att`` (after :meth:`emit`),
        or with ``scale`` (logits of another op, e.g. a squeeze-excitation) as attention."""
        return g.index_set(heads, channels, logits=self._logits.get(mask), const=self.static.get(mask),
                           att=scale if scale is not None else self._logits.get(att), groups=groups,
                           host_groups=host_groups)


@BLOCK_DEPLOYERS.register(GatedBlock)
class KitDeployer:
    """A kit-described block, lowered op by op (see the module docstring)."""

    def __init__(self, block: GatedBlock, where: str):
        spec = block.spec
        if spec is None or spec.result is None:
            raise ValueError(f"deploy: {where} ({type(block).__name__}) has no kit description: describe it with "
                             "GatedBlock.describe(...) or register a deployer with "
                             "@msgc.deploy.BLOCK_DEPLOYERS.register")
        self.block, self.spec, self.where = block, spec, where
        modules = []
        for g in spec.gates:
            modules += [(g.mask_path, g.mask), (g.attention_path, g.attention)]
        self.gate_names = [(g.mask_path, g.attention_path) for g in spec.gates]
        self.sources = GateSources(where, modules)
        self._plan_outputs()
        self._plan_fusion()
        self._plan_excitations()
        self.weights: Dict[ConvNode, ConvWeights] = {}
        self.host_groups: Dict[ConvNode, int] = {}  # a convolution's own groups (within which heads work)
        self.split: Dict[Gate, int] = {}  # the host groups a gate's sets are split by
        for n in spec.nodes:
            if isinstance(n, ConvNode):
                bn = n.norm
                if n in self.folded_pre:  # the consumer's pre-activation, folded into this producer
                    bn = self.folded_pre[n].pre
                self.weights[n] = ConvWeights(n.conv, bn, n.conv.groups, f"{where}.{n.name}")
                if not n.depthwise:
                    heads = n.gate.heads if n.gate is not None and n.gate.kind == "heads" else 1
                    self.host_groups[n] = n.conv.groups // heads
                    if n.gate is not None and self.host_groups[n] > 1:
                        self.split[n.gate] = self.host_groups[n]

    # ---- planning (once) ----------------------------------------------------------------------------

    def _plan_outputs(self):
        """Which channels each producer computes: (mode, gate) per conv node, the channels of depthwise ones,
        and the groups each gate's sets need."""
        spec = self.spec
        self.outputs: Dict[ConvNode, Tuple[int, Gate]] = {}
        self.groups: Dict[Gate, int] = {}
        for n in spec.nodes:
            if not (isinstance(n, ConvNode) and n.gate is not None):
                continue
            gated, ungated = spec.bonus_chain(n)
            if any(isinstance(u, AffineNode) for u in ungated):  # a full-width op in between: no restriction
                continue
            for u in ungated:
                self.outputs[u] = (UNION, n.gate)
            if gated is not None:
                if gated.gate.kind == "heads":
                    self.outputs[gated] = (GROUPS, n.gate)
                    self.groups[n.gate] = gated.conv.groups
                else:
                    self.outputs[gated] = (UNION, n.gate)
        for n, (mode, gate) in self.outputs.items():
            if mode == UNION and not n.depthwise and n.conv.groups != 1:
                raise ValueError(f"deploy: {self.where}.{n.name}: a grouped convolution cannot compute the union "
                                 "of the next gate's channels")

    def _plan_fusion(self):
        """Pre-activations folded into their producers, residual additions fused into convolutions."""
        spec = self.spec
        self.folded_pre: Dict[ConvNode, ConvNode] = {}  # producer -> consumer whose pre it carries
        self.pre_folded = set()
        self.act_of: Dict[ConvNode, Optional[str]] = {}
        for n in spec.nodes:
            if isinstance(n, ConvNode):
                self.act_of[n] = n.act
        for n in spec.nodes:
            if isinstance(n, ConvNode) and n.pre is not None:
                p = n.x.producer
                if (isinstance(p, ConvNode) and p.norm is None and p.act is None and spec.consumers(n.x) == [n]
                        and not p.depthwise):
                    self.folded_pre[p] = n
                    self.pre_folded.add(n)
                    self.act_of[p] = n.pre_act
        self.fused: Dict[AddNode, Tuple[ConvNode, object]] = {}  # add -> (conv, the other operand)
        for n in spec.nodes:
            if not isinstance(n, AddNode):
                continue
            for mine, other in ((n.a, n.b), (n.b, n.a)):
                p = mine.producer
                if (isinstance(p, ConvNode) and self.act_of[p] is None and spec.consumers(mine) == [n]
                        and p not in self.outputs and self._before(other, p)):
                    self.fused[n] = (p, other)
                    self.act_of[p] = n.act
                    break
            else:
                raise ValueError(f"deploy: {self.where}.{n.name}: the kernels add a residual in the stores of the "
                                 "convolution it follows (one without an activation of its own, whose operand is "
                                 "computed first); this addition is not of that form")

    def _plan_excitations(self):
        """A squeeze-excitation's scale is folded into the one convolution that reads it (as attention on
        its input channels): that convolution's sets are made after the excitation."""
        self.excitations: Dict[SENode, FoldedGenerators] = {}
        self.excited: Dict[ConvNode, SENode] = {}
        for n in self.spec.nodes:
            if not isinstance(n, SENode):
                continue
            readers = self.spec.consumers(n.out)
            conv = readers[0] if len(readers) == 1 else None
            if not (isinstance(conv, ConvNode) and not conv.depthwise and conv.conv.groups == 1
                    and (conv.gate is None or (conv.gate.kind == "channel" and conv.gate.attention is None))):
                raise ValueError(f"deploy: {self.where}.{n.name}: a squeeze-excitation deploys folded into the one "
                                 "ungrouped convolution that reads it, whose gate has no attention of its own")
            self.excitations[n] = FoldedGenerators.of_squeeze_excitation(n.module, f"{self.where}.{n.name}")
            self.excited[conv] = n

    def _before(self, value, node) -> bool:
        """Whether ``value`` is made before ``node`` runs."""
        nodes = self.spec.nodes
        return value.producer is None or nodes.index(value.producer) < nodes.index(node)

    # ---- emission (per input size) --------------------------------------------------------------------

    def emit(self, g: Graph, x: Buffer, out: Optional[Buffer] = None) -> Buffer:
        """The block's ops on ``x``; ``out``: where a concatenating block's new channels go."""
        spec = self.spec
        buf = {spec.input: x}
        sets: Dict[Gate, Optional[IndexSet]] = {}
        res_of = {conv: other for (conv, other) in self.fused.values()}
        result_new = None  # a concatenating block: the value whose channels are new
        if isinstance(spec.result.producer, ConcatNode) and spec.result.producer.a is spec.input:
            result_new = spec.result.producer.b

        deferred = {conv.gate for conv in self.excited if conv.gate is not None}
        scales = {}  # a squeeze-excitation's output value -> the logits of its scale

        def make_set(gate, scale=None):
            mask, att = self.gate_names[gate.index]
            heads = gate.heads if gate.kind == "heads" else 1
            sets[gate] = self.sources.sets(g, mask, att, heads, gate.channels, self.groups.get(gate, 0),
                                           self.split.get(gate, 1), scale)

        def decide():
            self.sources.emit(g, buf[spec.context_value])
            for gate in spec.gates:
                if gate not in deferred:
                    make_set(gate)

        decided = False
        for n in spec.nodes:
            if not decided and spec.context_value in buf:
                decide()
                decided = True
            if isinstance(n, ConvNode):
                src = buf[n.x]
                if n.pre is not None and n not in self.pre_folded:
                    src = g.affine(src, n.pre, _ACT[n.pre_act])
                mode, gate = self.outputs.get(n, (ALL, None))
                out_set = None if gate is None else sets[gate]
                if n.depthwise:
                    buf[n.out] = g.depthwise(src, self.weights[n], out_set, _ACT[self.act_of[n]])
                    continue
                if n in self.excited:  # the excitation's scale as attention on this convolution's inputs
                    scale = scales[self.excited[n].out]
                    if n.gate is not None:
                        make_set(n.gate, scale)
                        in_set = sets[n.gate]
                    else:
                        in_set = g.index_set(1, n.x.channels, att=scale)
                else:
                    in_set = None if n.gate is None else sets[n.gate]
                gate_att = n.gate is not None and n.gate.attention is not None
                att = in_set is not None and (n in self.excited or gate_att)
                res = buf[res_of[n]] if n in res_of else None
                dst = out if (n.out is result_new and out is not None) else None
                buf[n.out] = g.conv(src, self.weights[n], in_set, att=att, outputs=(mode, out_set),
                                    act=_ACT[self.act_of[n]], res=res, dst=dst, host_groups=self.host_groups[n])
            elif isinstance(n, AffineNode):
                buf[n.out] = g.affine(buf[n.x], n.norm, _ACT[n.act], macs=n.cost)
            elif isinstance(n, AddNode):
                conv, _ = self.fused[n]
                buf[n.out] = buf[conv.out]
            elif isinstance(n, ConcatNode):
                if n.out is not spec.result or n.a is not spec.input:
                    raise ValueError(f"deploy: {self.where}.{n.name}: only a block's output that appends new "
                                     "channels to its input can be a concatenation")
                buf[n.out] = buf[n.b]
            elif isinstance(n, SENode):  # its scale, from the pooled input, folded into its reader
                (scales[n.out],) = g.gates(buf[n.x], self.excitations[n])
                buf[n.out] = buf[n.x]
        if not decided:
            decide()
        g.add_block_macs(self.block.sample_macs, x.h, x.w, [sets[gate] for gate in spec.gates])
        return buf[result_new] if result_new is not None else buf[spec.result]


def deploy_block(block: nn.Module, where: str):
    """The deployer of ``block`` (found through its class hierarchy)."""
    return BLOCK_DEPLOYERS.get(block)(block, where)
