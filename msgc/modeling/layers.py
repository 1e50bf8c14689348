"""Building blocks of MSGC: the gate, the mask and attention generators, and gated inputs.

The generators map a block's pooled input (its *context*, ``N x C_in x 1 x 1``) to one value per
sample, head and gated channel (``N x heads x C``). Their state-dict layout (``conv.0`` 1x1 conv,
``conv.1`` BatchNorm, ``conv.3`` 1x1 conv) is the original MSGC release's, so its checkpoints load
without renaming.
"""
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..utils.errors import InvalidValueError

__all__ = [
    "BinaryGate",
    "Generator",
    "MaskGenerator",
    "mask_generators",
    "set_gate_thresholds",
    "budget_generators",
    "set_budget_inputs",
    "fold_gate_thresholds",
    "set_gate_noise",
    "AttentionGenerator",
    "generator_macs",
    "gate_heads",
    "gate_channels",
    "gated_conv",
]


class BinaryGate(nn.Module):
    """Binary gate with logistic noise and a straight-through estimator.

    Training: ``sigmoid((logits - threshold + noise * (log u - log(1 - u))) / temperature)`` with
    ``u ~ U(0, 1)``, thresholded at 0.5 in the forward pass while the gradient is the soft value's. Eval:
    ``logits >= threshold``, no noise. With the defaults (``threshold`` 0, ``noise`` 1) this is the
    reference's gate exactly.

    Attributes:
        threshold: the logit at which the gate opens: a float, or one per sample (a 1-D tensor whose
            length must be the batch's; :func:`msgc.modeling.set_budget` sets it per image). Gate
            calibration (:func:`msgc.evaluation.calibrate_gates`) moves it, and
            :func:`fold_gate_thresholds` moves a float one into the generators' bias; it is not saved in
            checkpoints.
        noise: scale of the logistic noise in training (1: the paper); a noise schedule
            (``MODEL.MSGC.NOISE``) lowers it towards the deterministic gates of evaluation.
    """

    def __init__(self, temperature: float = 2.0 / 3.0, eps: float = 1e-8):
        super().__init__()
        self.temperature = temperature
        self.eps = eps
        self.threshold = 0.0
        self.noise = 1.0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if isinstance(self.threshold, torch.Tensor):
            logits = logits - per_sample(self.threshold, logits)
        elif self.threshold:
            logits = logits - self.threshold
        if not self.training:
            out = (logits >= 0).to(logits.dtype)
        else:
            u = torch.rand_like(logits)
            noise = torch.log(u + self.eps) - torch.log(1 - u + self.eps)
            if self.noise != 1.0:
                noise = noise * self.noise
            soft = torch.sigmoid((logits + noise) / self.temperature)
            hard = (soft >= 0.5).to(soft.dtype)
            out = (hard - soft).detach() + soft
        self.last_open = out.detach().mean()  # fraction of open gates in the last batch, for logging
        return out

    def extra_repr(self):
        t = self.threshold
        extra = f", threshold={t.tolist()}" if isinstance(t, torch.Tensor) else (f", threshold={t:.4g}" if t else "")
        noise = f", noise={self.noise:.3g}" if self.noise != 1.0 else ""
        return f"temperature={self.temperature:.4g}" + extra + noise


def per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One value per sample of ``x`` (``N x ...``), shaped to broadcast over it."""
    if values.dim() != 1 or values.numel() != x.size(0):
        raise InvalidValueError(f"a per-image budget of {values.numel()} values for a batch of {x.size(0)} images; "
                                "give one budget per image (or one number for all)")
    return values.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def generator_macs(in_channels: int, channels: int, heads: int, reduction: int, budget_input: bool = False) -> int:
    """MACs of one generator per sample, as the reference counts them (the last conv's bias is free).

    A generator with a budget input (:class:`MaskGenerator`, ``MODEL.MSGC.BUDGET_RANGE``) adds one MAC
    to normalise the budget, one per hidden unit and one per output (its two budget weights)."""
    hidden = in_channels // reduction
    macs = (in_channels + 1) * hidden + hidden * channels * heads
    return macs + (1 + hidden + channels * heads if budget_input else 0)


class Generator(nn.Module):
    """Context -> one value per sample, head and channel (``N x heads x channels``): a 1x1 convolution
    to ``in_channels // reduction`` hidden units (``first``), BatchNorm (``norm``), ReLU and a 1x1
    convolution to ``heads x channels`` outputs (``second``). Base of the mask and attention
    generators."""

    def __init__(self, in_channels, channels, heads, reduction, bias):
        super().__init__()
        hidden = in_channels // reduction
        if hidden < 1:
            raise InvalidValueError(
                f"generator over {in_channels} input channels with reduction {reduction} has no "
                "hidden channel; use a wider layer or a smaller reduction"
            )
        self.in_channels, self.channels, self.heads, self.reduction = (
            in_channels, channels, heads, reduction)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels * heads, 1, bias=bias),
        )
        self.macs = generator_macs(in_channels, channels, heads, reduction)

    def logits(self, context: torch.Tensor) -> torch.Tensor:
        return self.conv(context).view(context.size(0), self.heads, self.channels)

    @property
    def first(self) -> nn.Conv2d:
        return self.conv[0]

    @property
    def norm(self) -> nn.BatchNorm2d:
        return self.conv[1]

    @property
    def second(self) -> nn.Conv2d:
        return self.conv[3]

    def extra_repr(self):
        return f"in={self.in_channels}, channels={self.channels}, heads={self.heads}"


class MaskGenerator(Generator):
    """Context -> binary mask ``N x heads x channels``: which channels each head reads.

    The last convolution's bias starts at ``gate_bias`` (2.0 in the paper), so training starts with
    nearly every gate open.

    With ``budget_range = (lo, hi)`` the MAC budget is an input too (one model for every budget of the
    range, ``MODEL.MSGC.BUDGET_RANGE``): the budget ``b`` (:attr:`budget`), normalised to the range as
    ``u = (2 b - lo - hi) / (hi - lo)`` (-1 at ``lo``, +1 at ``hi``), is added to the hidden units after
    the BatchNorm, before the ReLU (weights ``budget_hidden``), and to the logits (weights
    ``budget_logits``)::

        logits = second(relu(norm(first(context)) + u * budget_hidden)) + u * budget_logits

    Both weights start at 0: the generator starts as the paper's. The budget enters after the
    BatchNorm, which would remove a term that is constant over a training batch.

    Attributes:
        budget: the budget the generator decides for: a float, one per sample (a 1-D tensor), or None
            (the range's upper end). :func:`msgc.modeling.set_budget` sets it.
    """

    def __init__(self, in_channels, channels, heads=1, reduction=4, temperature=2.0 / 3.0,
                 gate_bias=2.0, budget_range=None):
        super().__init__(in_channels, channels, heads, reduction, bias=True)
        nn.init.constant_(self.conv[3].bias, gate_bias)
        self.gate = BinaryGate(temperature)
        self.budget_range = None if not budget_range else (float(budget_range[0]), float(budget_range[1]))
        self.budget = None
        if self.budget_range is not None:
            self.budget_hidden = nn.Parameter(torch.zeros(in_channels // reduction))
            self.budget_logits = nn.Parameter(torch.zeros(heads * channels))
            self.macs = generator_macs(in_channels, channels, heads, reduction, budget_input=True)

    def budget_code(self, budget=None):
        """The normalised budget input ``u`` of ``budget`` (default :attr:`budget`; None: the range's
        upper end): a float, or a tensor of one per sample."""
        lo, hi = self.budget_range
        budget = self.budget if budget is None else budget
        if budget is None:
            return 1.0
        return (2.0 * budget - lo - hi) / (hi - lo)

    def logits(self, context: torch.Tensor) -> torch.Tensor:
        if self.budget_range is None:
            return super().logits(context)
        u = self.budget_code()
        if isinstance(u, torch.Tensor):
            u = per_sample(u, context)
        hidden = self.norm(self.first(context)) + u * self.budget_hidden.view(1, -1, 1, 1)
        out = self.second(F.relu(hidden)) + u * self.budget_logits.view(1, -1, 1, 1)
        return out.view(context.size(0), self.heads, self.channels)

    def forward(self, context):
        return self.gate(self.logits(context))

    def extra_repr(self):
        extra = "" if self.budget_range is None else f", budget_range={list(self.budget_range)}"
        return super().extra_repr() + extra

    def output_bias(self) -> torch.Tensor:
        """The last convolution's bias with the gate's threshold moved into it: the bias of a generator
        whose gates open at logit 0 and decide as this one's do (what deployment folds)."""
        _check_foldable(self.gate.threshold)
        bias = self.second.bias.detach()
        return bias - self.gate.threshold if self.gate.threshold else bias

    def fold_threshold(self):
        """Move the gate's threshold into the last convolution's bias (the gate then opens at 0)."""
        _check_foldable(self.gate.threshold)
        if self.gate.threshold:
            with torch.no_grad():
                self.second.bias.sub_(self.gate.threshold)
            self.gate.threshold = 0.0


def _check_foldable(threshold):
    if isinstance(threshold, torch.Tensor):
        raise InvalidValueError("per-image gate thresholds (a budget per image) cannot be folded into the biases; "
                                "set one budget (or threshold) for every image first")


def mask_generators(model: nn.Module):
    """The :class:`MaskGenerator` modules of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MaskGenerator)]


def set_gate_thresholds(model: nn.Module, threshold):
    """Every gate of ``model`` opens where its logit is at least ``threshold`` (0: the paper's gates): one
    float, or a 1-D tensor of one per sample (the batches that follow must have that many)."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.detach().flatten()
    else:
        threshold = float(threshold)
    for m in mask_generators(model):
        m.gate.threshold = threshold


def fold_gate_thresholds(model: nn.Module):
    """Move every gate's threshold into its generator's bias: the same decisions, from a state dict of
    the same layout (a checkpoint that any msgc model and the reference load as usual)."""
    for m in mask_generators(model):
        m.fold_threshold()


def budget_generators(model: nn.Module):
    """The mask generators of ``model`` that take the MAC budget as an input (``MODEL.MSGC.BUDGET_RANGE``)."""
    return [m for m in mask_generators(model) if m.budget_range is not None]


def set_budget_inputs(model: nn.Module, budget) -> None:
    """The MAC budget that every budget-input generator of ``model`` decides for: a float, a 1-D tensor of
    one per sample, or None (the trained range's upper end)."""
    if isinstance(budget, torch.Tensor):
        budget = budget.detach().flatten().double()
    elif budget is not None:
        budget = float(budget)
    for m in budget_generators(model):
        m.budget = budget


def set_gate_noise(model: nn.Module, scale: float):
    """Scale the logistic noise of every gate of ``model`` in training (1: the paper, 0: none)."""
    for m in model.modules():
        if isinstance(m, BinaryGate):
            m.noise = float(scale)


class AttentionGenerator(Generator):
    """Context -> channel attention ``N x heads x channels``; starts as exactly 1 (weight 0, bias 1)."""

    def __init__(self, in_channels, channels, heads=1, reduction=4):
        super().__init__(in_channels, channels, heads, reduction, bias=True)
        self.reset_output()

    def reset_output(self):
        nn.init.zeros_(self.conv[3].weight)
        nn.init.ones_(self.conv[3].bias)

    def forward(self, context):
        return self.logits(context)


def _scale(mask, att):
    if mask is None:
        return att
    return mask if att is None else mask * att


def gate_channels(x: torch.Tensor, mask=None, att=None) -> torch.Tensor:
    """Multiply the channels of ``x`` (N x C x H x W) by a single-head mask and/or attention (N x 1 x C)."""
    scale = _scale(mask, att)
    if scale is None:
        return x
    return x * scale.view(x.size(0), x.size(1), 1, 1)


def gate_heads(x: torch.Tensor, mask=None, att=None, heads: int = 1, groups: int = 1) -> torch.Tensor:
    """The MSGC input: ``x`` repeated once per head, head i scaled by its mask (and attention).

    ``x``: N x C x H x W; ``mask``/``att``: N x heads x C (or None: all ones). Returns
    N x (heads*C) x H x W, the input of a convolution with ``groups = heads x groups``: head-major
    without host groups; with ``groups`` host groups (a ResNeXt's grouped 3x3), group-major, each
    host group's channels repeated once per head (``[group][head][channel of the group]``), so that
    conv group ``g * heads + h`` reads head h's copy of host group g. One broadcast replaces the
    reference's loop over heads. A channels-last ``x`` (what :class:`msgc.data.Normalizer` gives on
    CUDA) gives a channels-last result: the broadcast runs with the channels as the last axis.
    """
    n, c, h, w = x.shape
    scale = _scale(mask, att)
    if scale is None and heads == 1:
        return x
    heads = heads if scale is None else scale.size(1)
    cg = c // groups
    if scale is not None:  # group-major: N x groups x heads x channels of the group
        scale = scale.reshape(n, heads, groups, cg).transpose(1, 2)
    if _channels_last(x):
        xg = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, 1, cg)
        out = xg.expand(-1, -1, -1, -1, heads, -1) if scale is None else xg * scale.reshape(n, 1, 1, groups, heads, cg)
        return out.reshape(n, h, w, heads * c).permute(0, 3, 1, 2)
    xg = x.reshape(n, groups, 1, cg, h, w)
    out = xg.expand(-1, -1, heads, -1, -1, -1) if scale is None else xg * scale.reshape(n, groups, heads, cg, 1, 1)
    return out.reshape(n, heads * c, h, w)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also plainly contiguous, as 1x1 maps are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def gated_conv(conv: nn.Conv2d, x: torch.Tensor, mask=None, att=None, heads: Optional[int] = None) -> torch.Tensor:
    """``conv(gate_heads(x, mask, att, heads, conv.groups // heads))``, computed the cheaper of two exact
    ways (``heads``: default ``conv.groups``, no host groups).

    The MSGC convolution's head ``i`` reads ``x`` scaled per sample by ``scale[:, i]`` (mask times
    attention). Materialising the heads' inputs writes ``heads x C x H x W`` values per sample and
    feeds a convolution with ``heads`` times the input channels. Scaling the weights instead gives
    each sample its own convolution, ``W * scale[n]`` over ``x[n]`` (one grouped convolution with
    ``groups = N`` times the host's groups), and writes ``C_out x C/groups x k x k`` values per
    sample: much less where feature maps are large and channels few (the early stages), more in the
    late stages, which keep the broadcast. Both are the same sum of products (up to float rounding)
    and count the same MACs.
    """
    heads = conv.groups if heads is None else heads
    groups = conv.groups // heads
    scale = _scale(mask, att)
    n, c, h, w = x.shape
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    if scale is None or heads == 1 or c * kernel >= heads * groups * h * w:
        return conv(gate_heads(x, mask, att, heads, groups))
    out_channels, cg = conv.out_channels, c // groups
    weight = conv.weight.reshape(1, groups, heads, out_channels // (groups * heads), cg, *conv.kernel_size)
    scale = scale.reshape(n, heads, groups, cg).transpose(1, 2).reshape(n, groups, heads, 1, cg, 1, 1)
    weight = (weight * scale).reshape(n * out_channels, cg, *conv.kernel_size)
    bias = None if conv.bias is None else conv.bias.repeat(n)
    out = F.conv2d(x.reshape(1, n * c, h, w), weight, bias, conv.stride, conv.padding, conv.dilation, n * groups)
    return out.reshape(n, out_channels, out.size(2), out.size(3))
