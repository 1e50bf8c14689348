"""Where the gates sit: the gated blocks and stages of a backbone, and each mask's convolution.

Everything here reads a model through public names only: module types (:class:`GatedBlock`,
:class:`MaskGenerator`, :class:`StaticMask`, :class:`AttentionGenerator`, ``nn.Conv2d``), their
``heads`` and ``channels`` and the convolutions' shapes, plus one forward pass of a blank image to
see which block runs at which input size and in which stage.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ..modeling.backbone.base import GatedBlock
from ..modeling.grouping import StaticMask
from ..modeling.layers import AttentionGenerator, MaskGenerator

__all__ = ["MASK_TYPES", "GatedLayer", "AttentionLayer", "gated_blocks", "gated_layers", "attention_layers",
           "conv_macs"]

_GENERATORS = (MaskGenerator, AttentionGenerator)

#: modules whose output (``N x heads x channels`` in {0, 1}) says which channels each head reads
MASK_TYPES = (MaskGenerator, StaticMask)


@dataclass
class GatedLayer:
    """One mask of a backbone and the convolution whose input it gates.

    Attributes:
        name: the mask module's name in the backbone (e.g. ``layer1.0.maskgen2``).
        block: the name of the :class:`GatedBlock` that owns it.
        stage: the stage (a key of ``forward_features``' output) the block belongs to.
        heads, channels: the mask's shape per sample.
        conv: the gated convolution's name (None if none could be matched).
        dense_macs: that convolution's multiply-adds per sample at full width (None without ``conv``).
        spectrum: whether the layer is a grouped convolution's mask (``heads`` equals the backbone's):
            the layers whose heads place a model between pruning and static grouping.
    """

    name: str
    block: str
    stage: str
    heads: int
    channels: int
    conv: Optional[str] = None
    dense_macs: Optional[int] = None
    spectrum: bool = False
    module: nn.Module = field(default=None, repr=False, compare=False)


@dataclass
class AttentionLayer:
    """One attention generator and the mask of the input it scales (None: every channel is open)."""

    name: str
    block: str
    stage: str
    heads: int
    channels: int
    mask: Optional[str] = None
    module: nn.Module = field(default=None, repr=False, compare=False)


def _device(module):
    return next(module.parameters()).device


def gated_blocks(backbone, h: int, w: int):
    """Run one blank image through the backbone and return its gated blocks in execution order.

    Each entry is ``(name, block, (h_in, w_in), stage)``. A block belongs to the stage whose output it
    produces or precedes; blocks after the last recognisable stage output go to the last stage.
    """
    names = {m: n for n, m in backbone.named_modules()}
    calls = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0][0].shape[-2:], out[0])))
             for m in backbone.modules() if isinstance(m, GatedBlock)]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feats, _ = backbone.forward_features(torch.zeros(1, 3, h, w, device=_device(backbone)))
    finally:
        backbone.train(was_training)
        for hook in hooks:
            hook.remove()
    stage_of_output = {id(t): name for name, t in feats.items()}
    last_stage = next(reversed(feats))
    out, pending = [], []
    for mod, size, result in calls:
        pending.append((names[mod], mod, tuple(size)))
        stage = stage_of_output.get(id(result))
        if stage is not None:
            out += [p + (stage,) for p in pending]
            pending = []
    return out + [p + (last_stage,) for p in pending]


def conv_macs(conv: nn.Conv2d, h_out: int, w_out: int) -> int:
    """Multiply-adds of a convolution per sample: outputs x inputs per group x kernel area."""
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * h_out * w_out


def _conv_out(size, conv, dim):
    k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _own_modules(block, types):
    """(name, module) of ``types`` inside ``block``, not inside its generators, in registration order."""
    inside_generators = {id(m) for g in block.modules() if isinstance(g, _GENERATORS) for m in g.modules()}
    return [(n, m) for n, m in block.named_modules() if isinstance(m, types) and id(m) not in inside_generators]


def _block_convs(block, h, w):
    """(name, conv, h_out, w_out) of the block's convolutions, each fed the previous one's output size.

    The chain follows registration order, which in the built-in blocks is the order of the main path
    (a ResNet's ``downsample`` comes after it and is never gated, so its size does not matter).
    """
    out = []
    for name, conv in _own_modules(block, nn.Conv2d):
        h, w = _conv_out(h, conv, 0), _conv_out(w, conv, 1)
        out.append((name, conv, h, w))
    return out


def _reads(conv, heads, channels):
    return conv.groups == heads and conv.in_channels == heads * channels


def _match(masks, convs):
    """Give each mask (registration order) the first convolution not yet taken that it can gate."""
    taken, result = set(), {}
    for name, mask in masks:
        for conv_name, conv, h, w in convs:
            if conv_name not in taken and _reads(conv, mask.heads, mask.channels):
                taken.add(conv_name)
                result[name] = (conv_name, conv_macs(conv, h, w))
                break
    return result


def _pair_attention(masks, attentions):
    """Attention generator -> the mask of the same input.

    By the original release's names first (``attgenK`` scales what ``maskgenK`` gates, a layout that
    its checkpoints fix), else the first unpaired mask of the same shape.
    """
    by_name = dict(masks)
    pairs, used = {}, set()
    for name, att in attentions:
        twin = name.replace("attgen", "maskgen")
        mask = by_name.get(twin)
        if mask is None or twin in used or (mask.heads, mask.channels) != (att.heads, att.channels):
            twin = next((n for n, m in masks if n not in used and (m.heads, m.channels) == (att.heads, att.channels)),
                        None)
        if twin is not None:
            used.add(twin)
            pairs[twin] = name
    return pairs


def gated_layers(backbone, h: int, w: int) -> List[GatedLayer]:
    """The masks of ``backbone`` at input size ``h x w``, in execution order of their blocks.

    Each mask is matched to the convolution whose input it gates: the first convolution of its block,
    in registration order, with ``groups == heads`` and ``in_channels == heads x channels`` that no
    earlier mask took. ``dense_macs`` is that convolution's cost at full width (:func:`conv_macs`); the
    paper's per-layer term adds one multiply-add per output for the BatchNorm and, with attention, the
    attention multiplications (see :mod:`msgc.modeling.macs`).
    """
    heads = backbone.heads
    layers = []
    for block_name, block, (bh, bw), stage in gated_blocks(backbone, h, w):
        masks = _own_masks(block)
        convs = _match(masks, _block_convs(block, bh, bw))
        for name, mask in masks:
            conv, macs = convs.get(name, (None, None))
            layers.append(GatedLayer(
                name=_join(block_name, name), block=block_name, stage=stage, heads=mask.heads,
                channels=mask.channels, conv=None if conv is None else _join(block_name, conv), dense_macs=macs,
                spectrum=mask.heads == heads, module=mask))
    return layers


def attention_layers(backbone, h: int, w: int) -> List[AttentionLayer]:
    """The attention generators of ``backbone``, each with the mask of the input it scales."""
    layers = []
    for block_name, block, _, stage in gated_blocks(backbone, h, w):
        masks = _own_masks(block)
        attentions = [(n, m) for n, m in block.named_modules() if isinstance(m, AttentionGenerator)]
        paired = {att: mask for mask, att in _pair_attention(masks, attentions).items()}
        for name, att in attentions:
            mask = paired.get(name)
            layers.append(AttentionLayer(
                name=_join(block_name, name), block=block_name, stage=stage, heads=att.heads,
                channels=att.channels, mask=None if mask is None else _join(block_name, mask), module=att))
    return layers


def _own_masks(block):
    return [(n, m) for n, m in block.named_modules() if isinstance(m, MASK_TYPES)]


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name
