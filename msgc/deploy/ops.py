"""Inference kernels of the deployed networks: one sample, channels-last, only the open channels.

A feature map travels between deployed layers as a 2D matrix ``HW x C`` (the channels-last layout
of a ``1 x C x H x W`` tensor) with its height and width beside it. Selecting channels is then a
column gather, and a 1x1 convolution a matrix product. Every op returns the MACs it executed, counted
from the shapes it ran with the paper's cost model (a multiply-add is one MAC, a folded BatchNorm costs
one per output element because the paper counts one, activations and additions are free).

Weights are stored once, at deploy time, in the layout that makes a sample's gather cheap:

- a stride-1 k x k convolution keeps ``in x out x k x k`` per head (spatially flipped: the layout of
  the equivalent transposed convolution), so the open inputs' weights are whole contiguous rows;
  strided ones keep ``out x (k*k) x in`` ("OHWI") and gather columns;
- a 1x1 convolution keeps ``in x out`` per head: the open inputs are contiguous rows, and the gathered
  block is the right operand of ``addmm`` as it is.

Attention is folded into whichever operand is smaller for that layer: the gathered weights, or the
gathered input columns (an exact rewrite either way, since the attention scales input channels).
"""
from collections import abc
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import native as native_kernels

__all__ = [
    "NONE", "RELU", "RELU6", "bn_affine", "fold_bn", "PreActivation", "to_matrix", "to_image", "FoldedConv", "HeadConv", "PointHeadConv",
    "DepthwiseConv", "Generators", "Split",
]


def bn_affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BatchNorm as ``x * scale + shift`` per channel -> (scale, shift), float32."""
    scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.float() + bn.eps)
    return scale, bn.bias.detach().float() - bn.running_mean.float() * scale


def fold_bn(weight: torch.Tensor, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A convolution weight (out first) and the eval-mode BatchNorm after it -> (weight, bias)."""
    weight = weight.detach().float()
    if bn is None:
        return weight.clone(), None
    scale, bias = bn_affine(bn)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bias


class PreActivation(nn.Module):
    """An eval-mode BatchNorm followed by ReLU on an ``HW x C`` matrix (DenseNet's pre-activations)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        scale, shift = bn_affine(bn)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).add_(self.shift).relu_()


def to_matrix(x: torch.Tensor) -> torch.Tensor:
    """``1 x C x H x W`` channels-last tensor -> ``HW x C`` view."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.size(1))


def to_image(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``HW x C`` matrix -> ``1 x C x H x W`` channels-last view."""
    return x.view(1, h, w, x.size(1)).permute(0, 3, 1, 2)


_ONEDNN = torch.backends.mkldnn.is_available()


def _out_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def conv2d(x, weight, bias, stride=1, padding=0, groups=1):
    """``F.conv2d``, sent straight to oneDNN on the CPU: PyTorch's own heuristic routes batch-1
    convolutions with small inputs (under 20480 elements) to a slower im2col kernel."""
    if _ONEDNN and x.device.type == "cpu":
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, [padding] * 2, [stride] * 2, [1, 1], groups)
    return F.conv2d(x, weight, bias, stride, padding, 1, groups)


#: Native kernels, one head asked for some of its outputs (``rows``), at most an eighth of them unread:
#: when to compute every output channel instead of gathering the asked-for columns of the weights.
#: Always below ``ALL_OUTPUTS`` output pixels (at 7x7 a layer is bound by reading its weights, whose
#: rows are read whole anyway), and at any size where the gather would copy at least
#: ``GATHER_FLOATS`` weights and ``out_pixels * unread < GATHER_COST * read``: a copied weight (read
#: scattered, mostly from memory) costs about as much as 32 multiply-adds. ResNet-50's 1024 -> 256
#: conv1 at 14x14 with 93% of its outputs read: 0.18 ms to gather, 0.05 ms for the extra outputs.
#: The size floor keeps the excess of executed over paper-counted MACs small (it is 1.1% for
#: DenseNet-74, whose many small 1x1 layers would otherwise add up to 2%). The caller then gets every
#: column (see ``HeadSets.reading``) and the executed MACs count them.
ALL_OUTPUTS, GATHER_FLOATS, GATHER_COST = 100, 1 << 17, 32


def _computes_all(self, ho, wo, idx, rows) -> bool:
    """Whether a one-head native convolution asked for ``rows`` computes every output (see above)."""
    if rows is None or self.heads != 1 or rows[0] is None:
        return False
    read, unread = rows[0].numel(), self.per_head - rows[0].numel()
    if 8 * unread > self.per_head:
        return False
    if ho * wo < ALL_OUTPUTS:
        return True
    n_in = self.in_channels if idx[0] is None else idx[0].numel()
    return n_in * read * self.kernel ** 2 >= GATHER_FLOATS and ho * wo * unread < GATHER_COST * read


#: activations fused into a convolution (its ``act`` argument)
NONE, RELU, RELU6 = 0, 1, 2


def _epilogue(out: torch.Tensor, act: int, res: Optional[torch.Tensor]) -> torch.Tensor:
    """``act(out + res)`` in place: what the native kernels fuse into their stores."""
    if res is not None:
        out.add_(res)
    if act == RELU:
        out.relu_()
    elif act == RELU6:
        out.clamp_(0, 6)
    return out


def _native_heads(self, x, h, w, ho, wo, pos, idx, scale, rows, act, res):
    """Every head of a :class:`HeadConv` or :class:`PointHeadConv` built with ``native=True``, in one
    native call, written side by side into one output matrix: ``(out, ho, wo, executed MACs)``. The
    per-head lists come as :class:`Split` s from the native :class:`gates.HeadSets`; other lists are
    flattened first."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        raise RuntimeError("this deployed model runs msgc's CPU kernels (float32); deploy the model "
                           "on the device and in the dtype it will run in (deploy(model, native=False) "
                           "for PyTorch's kernels)")
    if _computes_all(self, ho, wo, idx, rows):
        rows = None  # computing the few unread outputs costs less than gathering around them
    flat_idx = _flat(idx)
    if flat_idx is False:
        flat_idx = Split.of([torch.arange(self.in_channels) if t is None else t for t in idx])
    n_in = [self.in_channels] * self.heads if flat_idx is None else flat_idx.sizes
    flat_pos, flat_rows, flat_scale = _flat(pos), _flat(rows), _flat(scale)
    if flat_pos is False:
        flat_pos = Split.of([torch.arange(n) if t is None else t for t, n in zip(pos, n_in)])
    if flat_rows is False:
        flat_rows = Split.of([torch.arange(self.per_head) if t is None else t for t in rows])
    if flat_scale is False:
        flat_scale = Split.of([torch.ones(n) if t is None else t for t, n in zip(scale, n_in)], torch.float32)
    return _native_all_heads(self, x, h, w, ho, wo, flat_idx, flat_pos, flat_rows, flat_scale, act, res)


class Split(abc.Sequence):
    """Per-head index tensors that are pieces of one flat int32 tensor, head after head, every head's
    entries present in ``flat``; ``counts`` (int32 tensor) and ``sizes`` (list) hold each head's number
    of entries. A piece is None where a head has all ``channels`` (unless ``keep_full``); ``all`` says
    every piece is. The pieces are sliced only when asked for: :func:`native.gconv_heads` runs all
    heads in one call from ``flat`` and ``counts``."""

    def __init__(self, flat: torch.Tensor, counts: torch.Tensor, sizes: List[int], channels: int,
                 keep_full: bool = False):
        self.flat, self.counts, self.sizes = flat, counts, sizes
        self.all = not keep_full and all(k == channels for k in sizes)
        self._channels, self._keep_full, self._pieces = channels, keep_full, None

    @classmethod
    def of(cls, pieces: List[torch.Tensor], dtype: torch.dtype = torch.int32) -> "Split":
        """A Split of the given per-head tensors (none of them None)."""
        sizes = [p.numel() for p in pieces]
        return cls(torch.cat([p.to(dtype) for p in pieces]), torch.tensor(sizes, dtype=torch.int32), sizes, -1,
                   keep_full=True)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i):
        if self._pieces is None:
            pieces, start = [], 0
            for k in self.sizes:
                pieces.append(None if k == self._channels and not self._keep_full else self.flat[start:start + k])
                start += k
            self._pieces = pieces
        return self._pieces[i]


def _flat(per_head):
    """Per-head index tensors -> None if every one is None (all channels), the sequence itself if it
    is a :class:`Split` (one flat tensor underneath), False otherwise."""
    if isinstance(per_head, Split):
        return None if per_head.all else per_head
    if per_head is None or all(t is None for t in per_head):
        return None
    return False


def _native_all_heads(self, x, h, w, ho, wo, idx, pos, rows, scale, act, res):
    """:func:`_native_heads`, all heads in one call of :func:`native.gconv_heads` (one parallel loop over
    every head's tiles; attention folded and chosen outputs' weights gathered in the same call) or, for
    narrow heads, :func:`native.gconv_px_heads` (the input's planes, scaled with attention, made inside)."""
    n_in = [self.in_channels] * self.heads if idx is None else idx.sizes
    n_out = [self.per_head] * self.heads if rows is None else rows.sizes
    out = x.new_empty(ho * wo, sum(n_out))
    sets = (None if idx is None else idx.counts, None if pos is None else pos.flat, None if idx is None else idx.flat,
            None if rows is None else rows.counts, None if rows is None else rows.flat)
    flat_scale = None if scale is None else scale.flat
    kk = self.kernel ** 2
    macs = ho * wo * sum(m * (n * kk + self.bn) for n, m in zip(n_in, n_out))
    if self.pixel:
        native_kernels.gconv_px_heads(x, h, w, self.kernel, self.padding, self.in_channels, self.per_head, *sets,
                                      self.weight, self.bias, out, act, res, flat_scale)
        if scale is not None:  # attention folded into each head's planes
            macs += h * w * sum(n_in)
    else:
        native_kernels.gconv_heads(x, h, w, self.kernel, self.stride, self.padding, self.in_channels, self.per_head,
                                   *sets, self.weight, self.bias, out, act, res, flat_scale)
        if scale is not None:  # the attention fold, into the inputs (h * w per channel) or the weights
            macs += sum(h * w * n if kk * m > h * w else n * kk * m for n, m in zip(n_in, n_out))
    return out, ho, wo, macs


def _pixel_kernel(stride: int, per_head: int) -> bool:
    """Whether heads of this width use :func:`native.gconv_px_heads` (vectorised over pixels): stride 1
    and at most 24 outputs per head, which would fill few lanes of the channel kernel's 16-wide vectors."""
    return stride == 1 and per_head <= 24


class FoldedConv(nn.Module):
    """A dense convolution with its BatchNorm folded in (the host's ungated convolutions).

    A stride-1 1x1 convolution is a matrix product (``addmm``). With ``native``, a strided 1x1 one
    (ResNet downsampling) runs on :func:`native.gconv`: oneDNN takes 4.2 ms for ResNet-50's
    1024 -> 2048 one at 14x14 -> 7x7 on this project's 2-core test machine, gconv 1.1 ms (README,
    "Speed"). Other convolutions (stems, MobileNetV2's last layer) run on oneDNN.
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, native: bool = False):
        super().__init__()
        weight, bias = fold_bn(conv.weight, bn)
        self.stride, self.padding, self.groups = conv.stride[0], conv.padding[0], conv.groups
        self.kernel = conv.kernel_size[0]
        self.pointwise = self.kernel == 1 and self.stride == 1 and self.groups == 1
        self.native = native and self.kernel == 1 and self.stride > 1 and self.groups == 1
        if self.pointwise:  # in x out, the right operand of addmm
            weight = weight.flatten(1).t().contiguous()
        elif self.native:
            weight = native_kernels.blocked(weight)
        else:
            weight = weight.contiguous(memory_format=torch.channels_last)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.in_per_group, self.out_channels = conv.in_channels // conv.groups, conv.out_channels
        self.bn = bn is not None

    def forward(self, x: torch.Tensor, h: int, w: int):
        """(HW x C_in, h, w) -> (HoWo x C_out, ho, wo, executed MACs)."""
        if self.pointwise:
            out = torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)
            ho, wo = h, w
        elif self.native:
            ho, wo = _out_size(h, 1, self.stride, self.padding), _out_size(w, 1, self.stride, self.padding)
            out = x.new_empty(ho * wo, self.out_channels)
            native_kernels.gconv(x, h, w, 1, self.stride, self.padding, None, None, self.weight, self.bias, out)
        else:
            out = conv2d(to_image(x, h, w), self.weight, self.bias, self.stride, self.padding, self.groups)
            ho, wo = out.shape[2:]
            out = to_matrix(out)
        n = out.size(0) * self.out_channels
        return out, ho, wo, n * (self.in_per_group * self.kernel ** 2 + self.bn)


class HeadConv(nn.Module):
    """A k x k convolution with ``heads`` groups whose heads read per-sample subsets of the input.

    Head ``i`` computes its output channels (all, or a chosen subset) from the input channels
    ``idx[i]`` only; nothing is computed for closed channels. With ``native`` every head runs on
    :mod:`msgc.deploy.native`'s kernels (see :func:`_native_heads`). Otherwise one convolution per head on the gathered
    input and weights, with a kernel chosen by the feature map's size:

    - 28x28 and larger (compute-bound, small weights): oneDNN's convolution, channels-last;
    - smaller (a batch-1 convolution is bound by reading its weights): an im2col/col2im + GEMM kernel
      (PyTorch's native one). oneDNN builds a kernel for every new shape, 0.3 ms for a convolution and
      1 ms for a transposed one on this CPU, and a gated head's shape changes with every sample; the
      GEMM kernels cost nothing to set up.

    Stride-1 convolutions keep their weights input-channel first (``in x out x k x k``, spatially
    flipped: the equivalent transposed convolution's layout), so that gathering the open inputs copies
    whole contiguous rows; strided ones keep ``out x k x k x in`` and gather columns.
    """

    #: smallest input area (pixels) run by oneDNN
    LARGE = 28 * 28

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], heads: int, native: bool = False):
        super().__init__()
        weight, bias = fold_bn(conv.weight, bn)  # out x in_per_head x k x k
        out, cin, k = weight.size(0), weight.size(1), weight.size(2)
        self.heads, self.per_head, self.in_channels, self.kernel = heads, out // heads, cin, k
        self.stride, self.padding = conv.stride[0], conv.padding[0]
        self.transposed = self.stride == 1 and 2 * self.padding == k - 1
        self.bn, self.native = bn is not None, native
        weight = weight.view(heads, out // heads, cin, k, k)
        self.pixel = native and _pixel_kernel(self.stride, self.per_head)
        if self.pixel:  # heads x out x in x (k*k), native.gconv_px_heads's layout
            weight = weight.reshape(heads, out // heads, cin, k * k)
            self.transposed = False
        elif native:  # per head: blocks of 16 outputs x in x (k*k) x 16, native.gconv's layout
            weight = torch.stack([native_kernels.blocked(wh) for wh in weight])
            self.transposed = False
        elif self.transposed:  # heads x in x out x k x k, spatially flipped
            weight = weight.flip(3, 4).transpose(1, 2)
        else:  # heads x out x (k*k) x in
            weight = weight.permute(0, 1, 3, 4, 2).reshape(heads, out // heads, k * k, cin)
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.view(heads, -1).contiguous(), persistent=False)

    def forward(self, x, h, w, pos: Sequence[Optional[torch.Tensor]], idx: Sequence[Optional[torch.Tensor]],
                scale: Sequence[Optional[torch.Tensor]], rows: Optional[Sequence[Optional[torch.Tensor]]] = None,
                act: int = NONE, res: Optional[torch.Tensor] = None):
        """Run every head.

        Args:
            x: HW x C input matrix.
            pos: per head, the columns of ``x`` it reads (None: all of them, in order).
            idx: per head, the same channels in the convolution's input numbering (None: all).
            scale: per head, attention for those channels (None: none).
            rows: per head, which of its output channels to compute (None: all).
            act: the activation applied to the output (:data:`RELU`, :data:`RELU6` or :data:`NONE`).
            res: a residual added to the output before the activation (only with ``rows`` None).

        Returns:
            (HoWo x C_out matrix with the heads' outputs side by side, ho, wo, executed MACs).
        """
        k, s, p = self.kernel, self.stride, self.padding
        ho, wo = _out_size(h, k, s, p), _out_size(w, k, s, p)
        if self.native:
            return _native_heads(self, x, h, w, ho, wo, pos, idx, scale, rows, act, res)
        large = h * w >= self.LARGE or not _ONEDNN or x.device.type != "cpu"
        outs, macs = [], 0
        for i in range(self.heads):
            out, m = self._head(x, h, w, ho, wo, large, i, pos[i], idx[i], scale[i],
                                None if rows is None else rows[i])
            outs.append(out)
            macs += m
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return _epilogue(out, act, res), ho, wo, macs

    def _head(self, x, h, w, ho, wo, large, i, pos, idx, scale, rows):
        bias = None if self.bias is None else self.bias[i]
        if rows is not None and bias is not None:
            bias = bias.index_select(0, rows)
        n_out = self.per_head if rows is None else rows.numel()
        cin = self.in_channels if idx is None else idx.numel()
        if cin == 0 or n_out == 0:  # a head with every input closed outputs its bias
            out = x.new_zeros(ho * wo, n_out) if bias is None else bias.expand(ho * wo, n_out).contiguous()
            return out, ho * wo * n_out * self.bn
        xs = x if pos is None else x.index_select(1, pos)
        weight = self._gather(i, idx, rows)
        macs = ho * wo * n_out * (cin * self.kernel ** 2 + self.bn)
        if scale is not None:
            if weight.numel() <= xs.numel():
                weight = weight * (scale.view(-1, 1, 1, 1) if self.transposed else scale)
            else:
                xs = xs * scale
            macs += min(weight.numel(), xs.numel())
        k = self.kernel
        if self.transposed and not large:
            image = xs.t().contiguous().view(1, cin, h, w)
            out = torch._C._nn.slow_conv_transpose2d(image, weight, [k, k], bias, [1, 1], [self.padding] * 2)
            return out.view(n_out, -1).t().contiguous(), macs
        if self.transposed:  # back to out x in x k x k
            weight = weight.flip(2, 3).transpose(0, 1)
        else:
            weight = weight.view(n_out, k, k, cin).permute(0, 3, 1, 2)
        if large:
            return to_matrix(conv2d(to_image(xs, h, w), weight, bias, self.stride, self.padding)), macs
        image = xs.t().contiguous().view(1, cin, h, w)
        out = torch.ops.aten._slow_conv2d_forward(image, weight.contiguous(), [k, k], bias, [self.stride] * 2,
                                                  [self.padding] * 2)
        return out.view(n_out, -1).t().contiguous(), macs

    def _gather(self, i, idx, rows):
        """Head i's weights for the given inputs and output rows, in this conv's layout."""
        weight = self.weight[i]
        if self.transposed:  # in x out x k x k
            if idx is not None and rows is not None:  # one pass over (in, out) pairs
                pairs = (idx[:, None] * self.per_head + rows[None, :]).view(-1)
                k = self.kernel
                return weight.view(-1, k, k).index_select(0, pairs).view(idx.numel(), rows.numel(), k, k)
            if idx is not None:
                weight = weight.index_select(0, idx)
            return weight if rows is None else weight.index_select(1, rows)
        if rows is not None:  # out x k*k x in
            weight = weight.index_select(0, rows)
        return weight if idx is None else weight.reshape(-1, self.in_channels).index_select(1, idx)


class PointHeadConv(nn.Module):
    """A 1x1 (stride 1) convolution with ``heads`` groups on per-sample input subsets: ``addmm`` per head
    on gathered inputs and weights, or (``native``) :func:`native.gconv` reading them in place.

    Keeps ``heads x in x out_per_head`` so that a head's open inputs are contiguous weight rows.
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], heads: int, native: bool = False):
        super().__init__()
        weight, bias = fold_bn(conv.weight, bn)
        out, cin = weight.size(0), weight.size(1)
        if conv.kernel_size != (1, 1) or conv.stride != (1, 1):
            raise ValueError(f"PointHeadConv needs a 1x1 stride-1 convolution, got {conv}")
        self.heads, self.per_head, self.in_channels, self.bn = heads, out // heads, cin, bn is not None
        self.kernel, self.stride, self.padding, self.native = 1, 1, 0, native
        self.pixel = native and _pixel_kernel(1, self.per_head)
        if self.pixel:
            weight = weight.view(heads, out // heads, cin, 1)
        elif native:  # per head: blocks of 16 outputs x in x 1 x 16 (native.gconv's layout)
            weight = torch.stack([native_kernels.blocked(wh) for wh in weight.view(heads, out // heads, cin)])
        else:
            weight = weight.view(heads, out // heads, cin).transpose(1, 2)
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.view(heads, -1).contiguous(), persistent=False)

    def forward(self, x, h, w, pos, idx, scale, rows=None, act=NONE, res=None):
        """Same contract as :meth:`HeadConv.forward` (1x1: the spatial size is unchanged)."""
        if self.native:
            return _native_heads(self, x, h, w, h, w, pos, idx, scale, rows, act, res)
        outs, macs = [], 0
        for i in range(self.heads):
            out, m = self._head(x, i, pos[i], idx[i], scale[i], None if rows is None else rows[i])
            outs.append(out)
            macs += m
        return _epilogue(outs[0] if len(outs) == 1 else torch.cat(outs, 1), act, res), h, w, macs

    def _head(self, x, i, pos, idx, scale, rows):
        weight, bias = self.weight[i], None if self.bias is None else self.bias[i]
        if idx is not None:
            weight = weight.index_select(0, idx)
        if rows is not None:
            weight = weight.index_select(1, rows)
            bias = None if bias is None else bias.index_select(0, rows)
        cin, n_out, hw = weight.size(0), weight.size(1), x.size(0)
        macs = hw * n_out * (cin + self.bn)
        if cin == 0 or n_out == 0:
            out = x.new_zeros(hw, n_out) if bias is None else bias.expand(hw, n_out).contiguous()
            return out, hw * n_out * self.bn
        xs = x if pos is None else x.index_select(1, pos)
        if scale is not None:
            if weight.numel() <= xs.numel():
                weight = weight * scale[:, None]
                macs += weight.numel()
            else:
                xs = xs * scale
                macs += xs.numel()
        out = torch.mm(xs, weight) if bias is None else torch.addmm(bias, xs, weight)
        return out, macs


class DepthwiseConv(nn.Module):
    """A depthwise k x k convolution (BatchNorm folded) run on a per-sample subset of its channels:
    oneDNN's, or (``native``, up to 3x3) :func:`native.dwconv`, which has no per-shape setup."""

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], native: bool = False):
        super().__init__()
        weight, bias = fold_bn(conv.weight, bn)
        native = native and conv.kernel_size[0] <= 3
        if native:  # k*k x C: 16 neighbouring channels' weights for a tap are one vector
            weight = weight.flatten(1).t()
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.stride, self.padding, self.kernel = conv.stride[0], conv.padding[0], conv.kernel_size[0]
        self.bn, self.native = bn is not None, native

    def forward(self, x, h, w, idx: Optional[torch.Tensor], act: int = NONE):
        """x: HW x |idx| (the kept channels) -> (act(HoWo x |idx|), ho, wo, MACs)."""
        weight, bias = self.weight, self.bias
        dim = 1 if self.native else 0
        if idx is not None:
            weight = weight.index_select(dim, idx)
            bias = None if bias is None else bias.index_select(0, idx)
        c = weight.size(dim)
        k, s, p = self.kernel, self.stride, self.padding
        ho, wo = _out_size(h, k, s, p), _out_size(w, k, s, p)
        if c == 0:
            return x.new_zeros(ho * wo, 0), ho, wo, 0
        if self.native:
            out = x.new_empty(ho * wo, c)
            native_kernels.dwconv(x, h, w, k, s, p, weight, bias, out, act)
        else:
            out = _epilogue(to_matrix(conv2d(to_image(x, h, w), weight, bias, s, p, c)), act, None)
        return out, ho, wo, ho * wo * c * (self.kernel ** 2 + self.bn)


class Generators(nn.Module):
    """Every gate and attention generator of a block, evaluated together on the block's context.

    Their first 1x1 convolutions (BatchNorm folded) are stacked into one matrix-vector product; each
    second convolution is its own. With ``native`` the context and both layers are one call of
    :func:`native.generators`. Returns one ``heads x channels`` logit matrix per generator, in order.
    MACs equal the generators' ``macs`` (the paper's count).
    """

    def __init__(self, generators: List[nn.Module], native: bool = False):
        super().__init__()
        firsts, biases, self.shapes, self.macs, self.native = [], [], [], 0, native
        for g in generators:
            w1, b1 = fold_bn(g.conv[0].weight.flatten(1), g.conv[1])
            firsts.append(w1)
            biases.append(b1)
            self.shapes.append((g.heads, g.channels, w1.size(0)))
            self.macs += g.macs
        self.register_buffer("w1", torch.cat(firsts) if firsts else None, persistent=False)
        self.register_buffer("b1", torch.cat(biases) if firsts else None, persistent=False)
        w2 = [g.conv[3].weight.detach().float().flatten(1).contiguous() for g in generators]
        b2 = [g.conv[3].bias.detach().float() for g in generators]
        if native:  # packed, with (rows, first hidden unit, hidden units, first output, first weight) each
            desc, unit, row, weight = [], 0, 0, 0
            for w in w2:
                desc.append([w.size(0), unit, w.size(1), row, weight])
                unit, row, weight = unit + w.size(1), row + w.size(0), weight + w.numel()
            self.register_buffer("desc", torch.tensor(desc, dtype=torch.int64).view(-1, 5), persistent=False)
            self.register_buffer("w2", torch.cat([w.view(-1) for w in w2]) if w2 else None, persistent=False)
            self.register_buffer("b2", torch.cat(b2) if b2 else None, persistent=False)
        else:
            for j, (w, b) in enumerate(zip(w2, b2)):
                self.register_buffer(f"w2_{j}", w, persistent=False)
                self.register_buffer(f"b2_{j}", b.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x: ``HW x C``, whose mean over pixels is the context."""
        if not self.shapes:
            return []
        if self.native:
            flat = native_kernels.generators(x, self.w1, self.b1, self.desc, self.w2, self.b2)
            out, start = [], 0
            for heads, channels, _ in self.shapes:
                out.append(flat[start:start + heads * channels].view(heads, channels))
                start += heads * channels
            return out
        hidden = torch.addmv(self.b1, self.w1, x.mean(0)).relu_()
        out, start = [], 0
        for j, (heads, channels, width) in enumerate(self.shapes):
            logits = torch.addmv(getattr(self, f"b2_{j}"), getattr(self, f"w2_{j}"), hidden[start:start + width])
            out.append(logits.view(heads, channels))
            start += width
        return out
