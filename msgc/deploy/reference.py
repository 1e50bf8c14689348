"""The PyTorch interpreter of a deployed graph: any device, no compiler (``deploy(model, native=False)``).

Samples run one after the other, ops one after the other. Each head of a gated convolution gathers
its open input columns and the matching weight slices and runs one convolution: a matrix product for
1x1, PyTorch's im2col kernel below 28x28 on the CPU (oneDNN builds a kernel for every new shape, and
a gated head's shape changes with every sample), oneDNN above. It computes exactly the channels the
graph asks for (no compute-all shortcut), and counts what it ran.
"""
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from .graph import (GROUPS, RELU, RELU6, UNION, AffineOp, Buffer, ConvOp, DepthwiseOp, GatesOp, Graph, HeadOp,
                    PoolOp, SetsOp)

__all__ = ["run_reference", "head_sets"]

_FULL, _UNION, _CONCAT = 0, 1, 2
#: smallest input area (pixels) run by oneDNN
_LARGE = 28 * 28


def _act(x: torch.Tensor, act: int) -> torch.Tensor:
    return x.relu_() if act == RELU else x.clamp_(0, 6) if act == RELU6 else x


def head_sets(logits: Optional[torch.Tensor], heads: int, channels: int, att: Optional[torch.Tensor],
              groups: int = 0, host_groups: int = 1, device=None) -> Dict:
    """numpy version of the native ``msgc_head_sets``: per head, the open channels (``idx``), their
    places in the union (``pos``) and attention (``vals``); the union (``uni``); per group the open
    channels numbered within it (``gidx``); and the counts."""
    device = device if logits is None and att is None else (att if logits is None else logits).device
    m = np.ones((heads, channels), bool) if logits is None else (logits.view(heads, channels) >= 0).cpu().numpy()
    rows, cols = np.nonzero(m)
    counts = m.sum(1).tolist()
    read = m.any(0)
    where = np.cumsum(read) - 1
    split = np.cumsum(counts)[:-1]

    def per_head(a):
        return [torch.from_numpy(p.astype(np.int64)).to(device) for p in np.split(a, split)]

    out = {"counts": counts, "idx": per_head(cols), "pos": per_head(where[cols]),
           "uni": torch.from_numpy(np.flatnonzero(read).astype(np.int64)).to(device), "n_uni": int(read.sum()),
           "masked": logits is not None}
    if att is not None:
        flat = att.reshape(-1).index_select(0, torch.from_numpy(rows * channels + cols).to(device))
        out["vals"] = list(flat.split(counts))
    if groups:
        per = channels // groups
        g = cols // per
        out["gcounts"] = np.bincount(g, minlength=groups).tolist()
        out["gidx"] = [torch.from_numpy((cols[g == i] - i * per).astype(np.int64)).to(device) for i in range(groups)]
    if host_groups > 1:  # per host group g and head h (g major): channels, rows within g, places in the union
        cg = channels // host_groups
        split = {"hidx": [], "hrow": [], "hpos": [], "hvals": []}
        for g in range(host_groups):
            for h in range(heads):
                sel = (rows == h) & (cols // cg == g)
                split["hidx"].append(torch.from_numpy(cols[sel].astype(np.int64)).to(device))
                split["hrow"].append(torch.from_numpy((cols[sel] - g * cg).astype(np.int64)).to(device))
                split["hpos"].append(torch.from_numpy(where[cols[sel]].astype(np.int64)).to(device))
                if att is not None:
                    split["hvals"].append(att[h, torch.from_numpy(cols[sel].astype(np.int64)).to(device)])
        out.update(split)
    return out


class _Sample:
    """One sample's buffers, sets, logits and executed MACs."""

    def __init__(self, graph: Graph, x: torch.Tensor):
        self.values = {graph.input.id: x}
        self.tags: Dict[int, Tuple[int, Optional[int]]] = {graph.input.id: (_FULL, None)}
        self.sets: Dict[int, Dict] = {}
        self.logits = x.new_empty(max(graph.logits_size, 1))
        self.executed = 0

    def _root(self, b: Buffer) -> torch.Tensor:
        if b.id not in self.values:
            self.values[b.id] = self.logits.new_zeros(b.h * b.w, b.cols)
        return self.values[b.id]

    def read(self, b: Buffer) -> Tuple[torch.Tensor, Tuple[int, Optional[int]]]:
        if b.parent is not None:
            return self._root(b.parent)[:, b.col0:b.col0 + b.cols], (_FULL, None)
        return self.values[b.id], self.tags.get(b.id, (_FULL, None))

    def write(self, b: Buffer, value: torch.Tensor, tag=(_FULL, None)) -> None:
        if b.parent is not None:
            self._root(b.parent)[:, b.col0:b.col0 + b.cols] = value
        else:
            self.values[b.id], self.tags[b.id] = value, tag


def _gates(st: _Sample, op: GatesOp):
    x, _ = st.read(op.src)
    gens = op.generators
    hidden = torch.addmv(gens.b1, gens.w1, x.mean(0)).relu_()
    for (w2, b2), d, out in zip(gens.seconds, gens.desc.tolist(), op.outputs):
        logits = torch.addmv(b2, w2, hidden[d[1]:d[1] + d[2]])
        st.logits[out.offset:out.offset + out.size] = logits.sigmoid_() if d[5] == 1 else logits
    st.executed += x.numel() + gens.macs


def _sets(st: _Sample, op: SetsOp):
    s = op.set
    logits = op.const if op.logits is None else st.logits[op.logits.offset:op.logits.offset + op.logits.size]
    if op.logits is None and op.const is None:
        logits = None
    att = None if op.att is None else st.logits[op.att.offset:op.att.offset + op.att.size].view(s.heads, s.channels)
    if logits is not None:
        logits = logits.to(st.logits.device)
    st.sets[s.id] = head_sets(logits, s.heads, s.channels, att, s.groups, s.host_groups, st.logits.device)


def _head_conv(x, h, w, weight, bias, k, s, p, cols, wrows, rows, scale):
    """One head: its columns of x (``HW x C``), weights ``m x rows x k x k`` picked by ``rows``/``wrows``;
    -> (``HoWo x m``, executed MACs of the attention fold)."""
    if rows is not None:
        weight = weight.index_select(0, rows)
        bias = None if bias is None else bias.index_select(0, rows)
    if wrows is not None:
        weight = weight.index_select(1, wrows)
    xs = x if cols is None else x.index_select(1, cols)
    m, n = weight.size(0), weight.size(1)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if n == 0 or m == 0:  # a head with every input closed outputs its bias
        out = x.new_zeros(ho * wo, m) if bias is None else bias.expand(ho * wo, m).contiguous()
        return out, 0
    fold = 0
    if scale is not None:
        if weight.numel() <= xs.numel():
            weight, fold = weight * scale.view(1, -1, 1, 1), weight.numel()
        else:
            xs, fold = xs * scale, xs.numel()
    if k == 1 and s == 1:
        w2 = weight.view(m, n).t()
        return (torch.mm(xs, w2) if bias is None else torch.addmm(bias, xs, w2)), fold
    if x.device.type == "cpu" and h * w < _LARGE:
        image = xs.t().contiguous().view(1, n, h, w)
        out = torch.ops.aten._slow_conv2d_forward(image, weight.contiguous(), [k, k], bias, [s, s], [p, p])
        return out.view(m, -1).t(), fold
    image = xs.view(1, h, w, n).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight.contiguous(memory_format=torch.channels_last), bias, s, p)
    return out.permute(0, 2, 3, 1).reshape(-1, m), fold


def _conv(st: _Sample, op: ConvOp):
    x, (tag, tag_set) = st.read(op.src)
    wt = op.weights
    heads, per, k = wt.heads, wt.per_head, wt.kernel
    S = None if op.in_set is None else st.sets[op.in_set.id]
    T = None if op.out_set is None else st.sets[op.out_set.id]
    out_tag = (_FULL, None)
    outs, macs = [], 0
    split = op.host_groups > 1
    for i in range(heads):  # kernel head i: host group i // set heads, the set's head i % set heads
        cols = wrows = scale = None
        if S is not None and split:
            wrows = S["hrow"][i]
            cols = S["hidx"][i] if tag == _FULL else S["hpos"][i]
            scale = S["hvals"][i] if op.att else None
        elif S is not None and S["masked"]:
            wrows = S["idx"][i]
            cols = wrows if tag == _FULL else S["pos"][i] if tag == _UNION else None
        elif split or op.host_groups > 1:  # an ungated grouped convolution: each group its own slice
            cg = wt.in_channels
            cols = torch.arange(i * cg, (i + 1) * cg, device=x.device)
        if S is not None and op.att and not split:
            scale = S["vals"][i]
        rows = None
        if T is not None and T["masked"] and op.out_mode == UNION and T["n_uni"] < op.out_set.channels:
            rows, out_tag = T["uni"], (_UNION, op.out_set.id)
        elif T is not None and T["masked"] and op.out_mode == GROUPS:
            rows, out_tag = T["gidx"][i], (_CONCAT, op.out_set.id)
        weight = wt.weight[i * per:(i + 1) * per]
        bias = None if wt.bias is None else wt.bias[i * per:(i + 1) * per]
        out, fold = _head_conv(x, op.h, op.w, weight, bias, k, wt.stride, wt.padding, cols, wrows, rows, scale)
        n = weight.size(1) if wrows is None else wrows.numel()
        macs += out.numel() * (n * k * k + wt.bn) + fold
        outs.append(out)
    out = outs[0] if heads == 1 else torch.cat(outs, 1)
    if op.res is not None:
        out = out + st.read(op.res)[0]
    st.write(op.dst, _act(out, op.act), out_tag)
    st.executed += macs


def _depthwise(st: _Sample, op: DepthwiseOp):
    x, (tag, _) = st.read(op.src)
    wt = op.weights
    weight, bias, out_tag = wt.weight, wt.bias, (_FULL, None)
    S = None if op.set is None else st.sets[op.set.id]
    if S is not None and S["masked"] and S["n_uni"] < op.set.channels:
        uni = S["uni"]
        weight, bias = weight.index_select(0, uni), None if bias is None else bias.index_select(0, uni)
        if tag == _FULL:
            x = x.index_select(1, uni)
        out_tag = (_UNION, op.set.id)
    c = weight.size(0)
    image = x.reshape(1, op.h, op.w, c).permute(0, 3, 1, 2)
    out = F.conv2d(image, weight, bias, wt.stride, wt.padding, 1, c) if c else image.new_zeros(1, 0, 1, 1)
    out = out.permute(0, 2, 3, 1).reshape(-1, c)
    st.write(op.dst, _act(out, op.act), out_tag)
    st.executed += out.numel() * (wt.kernel ** 2 + wt.bn)


def _affine(st: _Sample, op: AffineOp):
    x, _ = st.read(op.src)
    st.write(op.dst, _act(x * op.scale + op.shift, op.act))
    st.executed += x.numel() * op.macs


def _pool(st: _Sample, op: PoolOp):
    x, _ = st.read(op.src)
    b = op.src
    image = x.reshape(1, b.h, b.w, -1).permute(0, 3, 1, 2)
    if op.kind == "max":
        out = F.max_pool2d(image, op.k, op.stride, op.padding)
    else:
        out = F.avg_pool2d(image, op.k, op.stride, op.padding)
    out = out.permute(0, 2, 3, 1).reshape(-1, x.size(1))
    st.write(op.dst, out)
    st.executed += op.macs * out.numel()


def _head(st: _Sample, op: HeadOp):
    x, _ = st.read(op.src)
    st.logits_out = torch.addmv(op.bias, op.weight, x.mean(0))
    st.executed += x.numel() + op.weight.numel()


_RUN = {GatesOp: _gates, SetsOp: _sets, ConvOp: _conv, DepthwiseOp: _depthwise, AffineOp: _affine, PoolOp: _pool,
        HeadOp: _head}


def _stats(graph: Graph, st: _Sample) -> List[int]:
    out = []
    for s, _ in graph.stats_layout():
        r = st.sets[s.id]
        out += list(r["counts"]) + [r["n_uni"]] + list(r.get("gcounts", []))
    return out


def run_reference(graph: Graph, images: torch.Tensor):
    """Run ``graph`` on ``images`` (``N x 3 x H x W``) -> (logits ``N x classes``, stats per sample,
    executed MACs per sample)."""
    logits, stats, executed = [], [], []
    for image in images:
        st = _Sample(graph, image.permute(1, 2, 0).reshape(-1, image.size(0)))
        for op in graph.ops:
            _RUN[type(op)](st, op)
        logits.append(st.logits_out)
        stats.append(_stats(graph, st))
        executed.append(st.executed)
    return torch.stack(logits), stats, executed
