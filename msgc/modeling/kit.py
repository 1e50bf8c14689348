"""The gated-block kit: a block describes its computation once, over its own modules, and gets its
forward pass, static costs, per-sample MACs and deployment from that description.

    class Block(GatedBlock):
        def __init__(self, cin, cout, grouping, attention):
            super().__init__()
            heads = grouping.heads
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout * heads, cout, 3, padding=1, groups=heads, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.maskgen1 = grouping.channel_mask(cin, cin, 4)
            self.maskgen2 = grouping.head_mask(cin, cout, 4)
            k = self.describe(cin, where="block")         # a BlockSpec; the context is the block input
            g1 = k.channel_gate(self.maskgen1, channels=cin)
            y = k.conv(k.input, self.conv1, self.bn1, gate=g1, act="relu")
            g2 = k.head_gate(self.maskgen2, channels=cout, heads=heads)
            y = k.conv(y, self.conv2, self.bn2, gate=g2)
            k.output(k.add(y, k.input, act="relu"))

The description is a small graph of ops over the block's values (feature maps). It holds references to
the block's modules and adds none, so state-dict keys stay those of the modules themselves.

Gates. A *channel gate* multiplies a convolution's input channels by a one-head mask (and attention):
the convolution reads only its open inputs. A *head gate* makes the convolution an MSGC convolution:
it has ``groups = heads`` (times the host's own groups), its input is broadcast once per head, and head
i reads the channels its mask opens (``gated_conv``). Masks and attentions come from the block's
generators, run on the context (the mean of one value, the block input by default), masks first.

Costs follow structure, with the paper's conventions (``get_flops()`` of the reference):

- a convolution costs ``out x in/groups x k x k x out_pixels``; a BatchNorm after it one MAC per
  output element (``norm_cost=False``: not counted, as the reference does for shortcuts and
  MobileNetV2's projection), a pre-activation before it one per input element;
- attention costs one multiplication per input element of each head; a squeeze-excitation its
  pooling and its scaling (one per element each) and its two layers;
- a convolution with a gate is *gated work* (``dgc``, at full width), others are ``main``; the
  context's pooling and the generators are ``gen`` (``context_cost``: counted where a generator reads
  the context, or, as the reference does for MobileNetV2 and DenseNet, wherever a gate module exists);
- per sample, gated work is scaled by its gate's open fraction, and work spent on channels that no
  later gate reads is subtracted (the *bonus*): where a value flows, through channel-wise ops
  (depthwise convolutions, BatchNorm, activations) only, into one gated convolution, its producers
  compute only the channels that convolution reads.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..utils.errors import InvalidValueError
from .layers import Generator, gate_channels, gated_conv
from .macs import Costs, MaskStats, conv_out, detached, heads_dot

__all__ = ["BlockSpec", "msgc_conv2d", "Value", "Gate", "ConvNode", "AffineNode", "AddNode", "ConcatNode", "SENode",
           "ACTIVATIONS"]

#: activations the kit applies (and the deployed kernels fuse)
ACTIVATIONS = {None: None, "relu": F.relu, "relu6": F.relu6}


def msgc_conv2d(in_channels: int, out_channels: int, kernel: int, heads: int, stride: int = 1,
                groups: int = 1, where: str = "") -> nn.Conv2d:
    """The convolution of an MSGC head gate: ``heads`` groups (times the host's ``groups``) over the
    input broadcast once per head; its weights have the dense convolution's shape, so the host's
    weights load into it. A head count that does not divide the layer is an error naming ``where``."""
    if out_channels % (heads * groups):
        raise InvalidValueError(f"{where}: MODEL.MSGC.HEADS={heads} does not divide its {out_channels} output channels"
                         + (f" ({out_channels // groups} in each of its {groups} groups)" if groups > 1 else ""))
    if in_channels % groups:
        raise InvalidValueError(f"{where}: {groups} groups do not divide its {in_channels} input channels")
    return nn.Conv2d(in_channels * heads, out_channels, kernel, stride, kernel // 2, groups=heads * groups, bias=False)


@dataclass(eq=False)
class Value:
    """A feature map inside a block: ``channels`` channels, made by ``producer`` (None: the input)."""

    channels: int
    producer: Optional[object] = None
    index: int = 0


class _Modules:
    """Nodes name the block's modules by their paths and look them up when used, so that a module
    replaced after the description (FrozenBatchNorm2d, SyncBatchNorm, a fused convolution) is the one
    used."""

    spec: "BlockSpec"

    def _get(self, path: Optional[str]):
        return None if path is None else self.spec.owner.get_submodule(path)


@dataclass(eq=False)
class Gate(_Modules):
    """A mask (and attention) over ``channels`` input channels of a convolution: one head (a channel
    gate) or ``heads`` (a head gate: an MSGC convolution). A description: the module that opens and
    closes channels is the mask generator's :class:`~msgc.modeling.layers.BinaryGate`."""

    spec: "BlockSpec"
    kind: str  # "channel" or "heads"
    mask_path: Optional[str]
    attention_path: Optional[str]
    channels: int
    heads: int = 1
    index: int = 0

    @property
    def mask(self) -> Optional[nn.Module]:
        return self._get(self.mask_path)

    @property
    def attention(self) -> Optional[nn.Module]:
        return self._get(self.attention_path)


@dataclass(eq=False)
class ConvNode(_Modules):
    spec: "BlockSpec"
    x: Value
    conv_path: str
    norm_path: Optional[str]
    act: Optional[str]
    gate: Optional[Gate]
    norm_cost: bool
    pre_path: Optional[str]  # a pre-activation (BatchNorm then ``pre_act``) on the input
    pre_act: Optional[str]
    name: str
    out: Value = None

    @property
    def conv(self) -> nn.Conv2d:
        return self._get(self.conv_path)

    @property
    def norm(self) -> Optional[nn.Module]:
        return self._get(self.norm_path)

    @property
    def pre(self) -> Optional[nn.Module]:
        return self._get(self.pre_path)

    @property
    def depthwise(self) -> bool:
        c = self.conv
        return c.groups > 1 and c.groups == c.in_channels == c.out_channels and self.gate is None


@dataclass(eq=False)
class AffineNode(_Modules):
    spec: "BlockSpec"
    x: Value
    norm_path: str
    act: Optional[str]
    cost: int  # MACs per element, as the paper counts this op (0 or 1)
    name: str
    out: Value = None

    @property
    def norm(self) -> nn.Module:
        return self._get(self.norm_path)


@dataclass(eq=False)
class AddNode:
    a: Value
    b: Value
    act: Optional[str]
    name: str
    out: Value = None


@dataclass(eq=False)
class ConcatNode:
    a: Value
    b: Value
    name: str
    out: Value = None


@dataclass(eq=False)
class SENode(_Modules):
    """Squeeze-excitation (torchvision's ``SqueezeExcitation``): ``x * sigmoid(fc2(relu(fc1(mean x))))``."""

    spec: "BlockSpec"
    x: Value
    module_path: str
    name: str
    out: Value = None

    @property
    def module(self) -> nn.Module:
        return self._get(self.module_path)


@dataclass
class Terms:
    """A block's static costs at one input size: per node, its MACs and kind; the totals."""

    cost: Dict[object, int]
    attention: Dict[object, int]
    main: int
    gen: int
    extra: int
    out_hw: Tuple[int, int]


@dataclass
class _Bonus:
    """Work on the channels that ``gate`` leaves unread: a gated producer's, and/or ungated ones'."""

    gate: Gate
    gated: Optional[ConvNode]  # a gated producer (its gated term is reduced)
    ungated: List[object] = field(default_factory=list)  # ungated producers (their full costs)


class BlockSpec:
    """The description of one gated block (see the module docstring). Built by
    :meth:`GatedBlock.describe`; ``where`` names the block in messages."""

    def __init__(self, owner: nn.Module, in_channels: int, where: str = "", context_cost: str = "generators"):
        if context_cost not in ("generators", "modules"):
            raise ValueError(f"{where}: context_cost must be 'generators' or 'modules', got {context_cost!r}")
        self.owner, self.where, self.context_cost = owner, where, context_cost
        self.input = Value(in_channels, None, 0)
        self.values: List[Value] = [self.input]
        self.nodes: List[object] = []
        self.gates: List[Gate] = []
        self.context_value = self.input
        self.result: Optional[Value] = None
        self._terms: Dict[Tuple[int, int], Terms] = {}
        self._bonuses: Optional[List[_Bonus]] = None

    # ---- building ---------------------------------------------------------------------------------

    def _path(self, module: Optional[nn.Module], what: str) -> Optional[str]:
        """The path of one of the block's modules (looked up again at each use)."""
        if module is None:
            return None
        for path, m in self.owner.named_modules():
            if m is module and path:
                return path
        raise ValueError(f"{self.where}: the {what} ({type(module).__name__}) is not a module of the block; assign it "
                         "to an attribute of the block before describing it")

    def _value(self, channels, node) -> Value:
        v = Value(channels, node, len(self.values))
        self.values.append(v)
        node.out = v
        self.nodes.append(node)
        return v

    def context(self, value: Value) -> None:
        """The generators read the mean of ``value`` (default: the block input)."""
        self.context_value = value

    def _gate(self, kind, mask, attention, channels, heads) -> Gate:
        for m, what in ((mask, "mask"), (attention, "attention")):
            if m is not None and getattr(m, "heads", heads) != heads:
                raise ValueError(f"{self.where}: a {kind} gate of {heads} heads got a {what} of {m.heads} heads")
        g = Gate(self, kind, self._path(mask, "mask"), self._path(attention, "attention"), channels, heads,
                 len(self.gates))
        self.gates.append(g)
        return g

    def channel_gate(self, mask: Optional[nn.Module], attention: Optional[nn.Module] = None, *,
                     channels: int) -> Gate:
        """A one-head mask (and attention) over a convolution's ``channels`` inputs."""
        return self._gate("channel", mask, attention, channels, 1)

    def head_gate(self, mask: Optional[nn.Module], attention: Optional[nn.Module] = None, *, channels: int,
                  heads: int) -> Gate:
        """The heads of an MSGC convolution: head i reads the ``channels`` inputs its mask opens."""
        return self._gate("heads", mask, attention, channels, heads)

    def conv(self, x: Value, conv: nn.Conv2d, norm: Optional[nn.BatchNorm2d] = None, *, gate: Optional[Gate] = None,
             act: Optional[str] = None, norm_cost: bool = True, pre: Optional[nn.BatchNorm2d] = None,
             pre_act: Optional[str] = None, name: str = "") -> Value:
        """``act(norm(conv(x)))``, ``x`` gated by ``gate``; ``pre``: a BatchNorm (then ``pre_act``) applied
        to ``x`` first (a pre-activation, counted one MAC per input element)."""
        name = name or f"conv{sum(isinstance(n, ConvNode) for n in self.nodes) + 1}"
        where = f"{self.where}.{name}"
        if act not in ACTIVATIONS or pre_act not in ACTIVATIONS:
            raise ValueError(f"{where}: activation must be one of {sorted(a for a in ACTIVATIONS if a)} or None")
        if gate is not None:
            if gate.channels != x.channels:
                raise ValueError(f"{where}: a gate over {gate.channels} channels on a {x.channels}-channel input")
            groups = gate.heads if gate.kind == "heads" else 1
            if conv.groups % groups or conv.in_channels != x.channels * groups:
                raise ValueError(f"{where}: a {gate.kind} gate of {gate.heads} heads needs a convolution over "
                                 f"{x.channels * groups} channels with groups divisible by {groups}; got "
                                 f"in_channels={conv.in_channels}, groups={conv.groups}")
        elif conv.in_channels != x.channels:
            raise ValueError(f"{where}: a convolution over {conv.in_channels} channels on a {x.channels}-channel input")
        node = ConvNode(self, x, self._path(conv, f"{name} convolution"), self._path(norm, f"{name} norm"), act, gate,
                        norm_cost, self._path(pre, f"{name} pre-activation"), pre_act, name)
        return self._value(conv.out_channels, node)

    def affine(self, x: Value, norm: nn.BatchNorm2d, act: Optional[str] = None, *, cost: int = 0,
               name: str = "") -> Value:
        """``act(norm(x))``; ``cost``: MACs per element as the paper counts them."""
        name = name or f"norm{len(self.nodes)}"
        return self._value(x.channels, AffineNode(self, x, self._path(norm, name), act, cost, name))

    def add(self, a: Value, b: Value, act: Optional[str] = None, name: str = "add") -> Value:
        if a.channels != b.channels:
            raise ValueError(f"{self.where}.{name}: adding {a.channels} to {b.channels} channels")
        return self._value(a.channels, AddNode(a, b, act, name))

    def concat(self, a: Value, b: Value, name: str = "concat") -> Value:
        return self._value(a.channels + b.channels, ConcatNode(a, b, name))

    def squeeze_excitation(self, x: Value, module: nn.Module, name: str = "se") -> Value:
        return self._value(x.channels, SENode(self, x, self._path(module, name), name))

    def output(self, value: Value) -> None:
        """End the description: ``value`` is the block's output."""
        ctx = self.context_value.producer
        if ctx is not None:
            made = self.nodes.index(ctx)
            for n in self.nodes[:made]:
                if isinstance(n, ConvNode) and n.gate is not None:
                    raise ValueError(f"{self.where}: the gates read the context made by {self.where}.{ctx.name}, "
                                     f"after {self.where}.{n.name} that needs them")
        self.result = value

    # ---- structure --------------------------------------------------------------------------------

    def consumers(self, value: Value) -> List[object]:
        out = []
        for n in self.nodes:
            ins = (n.a, n.b) if isinstance(n, (AddNode, ConcatNode)) else (n.x,)
            out += [n for v in ins if v is value]
        # the block's output, and the context (the generators read all its channels), count as consumers
        return out + ([None] if value is self.result else []) + (["context"] if value is self.context_value else [])

    @staticmethod
    def channelwise(node) -> bool:
        """Ops that keep channels apart: computing some of their output channels needs only those inputs."""
        return isinstance(node, AffineNode) or (isinstance(node, ConvNode) and node.depthwise)

    def bonus_chain(self, node: ConvNode) -> Tuple[Optional[ConvNode], List[object]]:
        """For a gated convolution: (the gated producer, the ungated producers) of its input whose output
        channels only it reads, through channel-wise ops (no producer: (None, []))."""
        ungated, v = [], node.x
        while v.producer is not None and self.consumers(v) == [node if not ungated else ungated[-1]]:
            p = v.producer
            if self.channelwise(p):
                ungated.append(p)
                v = p.x
                continue
            if isinstance(p, ConvNode):
                if p.gate is None:
                    ungated.append(p)
                    return None, ungated
                if p.gate.kind == "heads" and node.gate.kind == "heads":
                    return None, ungated  # a head's outputs read by several heads: no bonus
                return p, ungated
            return None, ungated
        return None, ungated

    def bonuses(self) -> List[_Bonus]:
        if self._bonuses is None:
            self._bonuses = []
            for n in self.nodes:
                if isinstance(n, ConvNode) and n.gate is not None:
                    gated, ungated = self.bonus_chain(n)
                    if gated is not None or ungated:
                        self._bonuses.append(_Bonus(n.gate, gated, ungated))
        return self._bonuses

    # ---- costs ------------------------------------------------------------------------------------

    def terms(self, h: int, w: int) -> Terms:
        """The static costs of every node on an ``h x w`` input (cached per size)."""
        key = (h, w)
        if key not in self._terms:
            self._terms[key] = self._measure(h, w)
        return self._terms[key]

    def _measure(self, h, w) -> Terms:
        size = {self.input: (h, w)}
        cost, attention, main, extra = {}, {}, 0, 0
        for n in self.nodes:
            if isinstance(n, ConvNode):
                ih, iw = size[n.x]
                c = n.conv
                oh = conv_out(ih, c.kernel_size[0], c.padding[0], c.stride[0])
                ow = conv_out(iw, c.kernel_size[1], c.padding[1], c.stride[1])
                macs = c.out_channels * (c.in_channels // c.groups) * c.kernel_size[0] * c.kernel_size[1] * oh * ow
                if n.norm is not None and n.norm_cost:
                    macs += c.out_channels * oh * ow
                if n.pre is not None:
                    macs += n.x.channels * ih * iw
                attended = n.gate is not None and n.gate.attention is not None
                att = n.gate.heads * n.x.channels * ih * iw if attended else 0
                cost[n], attention[n] = macs + att, att
                extra += att
                if n.gate is None:
                    main += macs
                size[n.out] = (oh, ow)
            elif isinstance(n, AffineNode):
                ih, iw = size[n.x]
                cost[n] = n.cost * n.x.channels * ih * iw
                main += cost[n]
                size[n.out] = (ih, iw)
            elif isinstance(n, SENode):
                ih, iw = size[n.x]
                m = n.module
                # the pooling and the scaling (one per element each) and both layers
                cost[n] = 2 * n.x.channels * ih * iw + 2 * m.fc1.in_channels * m.fc1.out_channels
                main += cost[n]
                size[n.out] = (ih, iw)
            else:  # add, concat: free
                size[n.out] = size[n.a]
        ch, cw = size[self.context_value]
        modules = [m for g in self.gates for m in (g.mask, g.attention) if m is not None]
        reads = any(isinstance(m, Generator) for m in modules) if self.context_cost == "generators" else bool(modules)
        gen = (self.context_value.channels * ch * cw if reads else 0) + sum(getattr(m, "macs", 0) for m in modules)
        return Terms(cost, attention, main, gen, extra, size[self.result])

    def costs(self, h: int, w: int) -> Tuple[Costs, int, int]:
        """The static :class:`Costs` of the block and its output size."""
        t = self.terms(h, w)
        dgc = sum(t.cost[n] for n in self.nodes if isinstance(n, ConvNode) and n.gate is not None)
        return Costs(main=t.main, dgc=dgc, gen=t.gen, extra=t.extra), t.out_hw[0], t.out_hw[1]

    def sample_macs(self, h: int, w: int, masks: Sequence[MaskStats]):
        """The paper's MACs of the block for one or more samples, from the :class:`MaskStats` of its
        gates (in the order they were declared): float64 tensors in the model, floats when deployed."""
        t = self.terms(h, w)
        scaled, dgc = {}, None
        for n in self.nodes:
            if isinstance(n, ConvNode) and n.gate is not None:
                scaled[n] = masks[n.gate.index].mean * t.cost[n]
                dgc = scaled[n] if dgc is None else dgc + scaled[n]
        bonus = None
        for b in self.bonuses():
            m = masks[b.gate.index]
            terms = []
            if b.gated is not None:
                if b.gated.gate.kind == "heads":  # each head's share of the outputs the next gate does not read
                    src = masks[b.gated.gate.index]
                    host_groups = b.gated.conv.groups // src.heads
                    head_open, unread = src.head_open(), m.group_unread(src.heads, host_groups)
                    if head_open is not None and unread is not None:
                        terms.append(heads_dot(head_open, unread) * (t.cost[b.gated] / src.heads))
                else:
                    terms.append(m.unread * detached(scaled[b.gated]))
            if b.ungated:
                terms.append(m.unread * sum(t.cost[u] for u in b.ungated))
            for term in terms:
                bonus = term if bonus is None else bonus + term
        total = t.main + t.gen
        if dgc is not None:
            total = total + dgc
        return total if bonus is None else total - bonus

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, uses_context: bool):
        """Run the block on ``x`` -> (output, the mask tensor of each gate (None where it has none))."""
        values = {self.input: x}
        masks: List[Optional[torch.Tensor]] = [None] * len(self.gates)
        atts: List[Optional[torch.Tensor]] = [None] * len(self.gates)
        decided = False
        for n in self.nodes:
            if not decided and self.context_value in values:
                masks, atts = self._decide(values[self.context_value], uses_context)
                decided = True
            values[n.out] = self._run(n, values, masks, atts)
        if not decided:
            masks, atts = self._decide(values[self.context_value], uses_context)
        return values[self.result], masks

    def _decide(self, v, uses_context):
        ctx = v.mean((2, 3), keepdim=True) if uses_context else v[:, :, :1, :1]
        masks = [None if g.mask is None else g.mask(ctx) for g in self.gates]  # masks first (random in training)
        atts = [None if g.attention is None else g.attention(ctx) for g in self.gates]
        return masks, atts

    @staticmethod
    def _act(x, act):
        fn = ACTIVATIONS[act]
        return x if fn is None else fn(x, inplace=True)

    def _run(self, n, values, masks, atts):
        if isinstance(n, ConvNode):
            x = values[n.x]
            if n.pre is not None:
                x = self._act(n.pre(x), n.pre_act)
            if n.gate is None:
                y = n.conv(x)
            elif n.gate.kind == "heads":
                y = gated_conv(n.conv, x, masks[n.gate.index], atts[n.gate.index], n.gate.heads)
            else:
                y = n.conv(gate_channels(x, masks[n.gate.index], atts[n.gate.index]))
            if n.norm is not None:
                y = n.norm(y)
            return self._act(y, n.act)
        if isinstance(n, AffineNode):
            return self._act(n.norm(values[n.x]), n.act)
        if isinstance(n, AddNode):
            return self._act(values[n.a] + values[n.b], n.act)
        if isinstance(n, ConcatNode):
            return torch.cat([values[n.a], values[n.b]], 1)
        if isinstance(n, SENode):
            return n.module(values[n.x])
        raise TypeError(f"{self.where}: unknown kit op {type(n).__name__}")
