"""msgc.deploy.native: the C kernels against PyTorch's convolution, and the fallback without them."""
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from msgc.deploy import deploy, native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def reference(x, h, w, weight, bias, k, s, p, cols, rows, scale=None):
    """The gathered convolution with PyTorch: x (HW x C) columns ``cols`` -> outputs ``rows``."""
    image = x.t().reshape(1, -1, h, w)[:, cols.long()]
    wt = weight[rows.long()][:, :, :, :] if rows is not None else weight
    if scale is not None:
        image = image * scale.view(1, -1, 1, 1)
    b = None if bias is None else (bias[rows.long()] if rows is not None else bias)
    return F.conv2d(image, wt, b, s, p).flatten(2)[0].t()


@pytest.mark.parametrize("k,s,p,h", [(3, 1, 1, 9), (3, 2, 1, 9), (1, 1, 0, 6), (1, 2, 0, 7), (3, 1, 1, 2)])
@pytest.mark.parametrize("n_out", [1, 5, 16, 17, 33, 70])
def test_gconv_matches_conv2d(k, s, p, h, n_out):
    g = torch.Generator().manual_seed(n_out * 7 + k)
    cin, cx = 11, 23
    x = torch.randn(h * h, cx + 3, generator=g)[:, :cx]  # a column slice: strided rows
    weight = torch.randn(80, cin, k, k, generator=g)
    bias = torch.randn(80, generator=g)
    wrow = torch.randperm(cin, generator=g)[:7].sort().values.int()
    cols = torch.randperm(cx, generator=g)[:7].int()  # any order: channel c of the head is column cols[c]
    rows = torch.randperm(80, generator=g)[:n_out].int()
    scale = torch.rand(7, generator=g)
    w_in = weight[:, wrow.long()]  # the head's weights in reading order
    want = reference(x, h, h, w_in, bias, k, s, p, cols, rows, scale)
    ho = (h + 2 * p - k) // s + 1
    blocked = native.blocked(weight)
    one = torch.tensor([7], dtype=torch.int32), torch.tensor([n_out], dtype=torch.int32)  # one head's counts
    out = torch.full((ho * ho, n_out + 2), float("nan"))[:, 1:n_out + 1]
    # chosen outputs (their weights gathered) and attention
    native.gconv_heads(x, h, h, k, s, p, cin, 80, one[0], cols, wrow, one[1], rows, blocked[None], bias[None], out,
                       scale=scale)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    # in place (no gather): all outputs, weight rows by index
    want_all = reference(x, h, h, w_in, bias, k, s, p, cols, None)
    out_all = torch.empty(ho * ho, 80)
    native.gconv(x, h, h, k, s, p, cols, wrow, blocked, bias, out_all, act=1)
    torch.testing.assert_close(out_all, want_all.relu(), rtol=1e-5, atol=1e-4)
    # a residual (strided rows) added before ReLU6, fused into the stores
    res = torch.randn(ho * ho, n_out + 5, generator=g)[:, 2:n_out + 2] * 4
    want_res = (reference(x, h, h, w_in, bias, k, s, p, cols, rows) + res).clamp(0, 6)
    out_res = torch.empty(ho * ho, n_out)
    native.gconv_heads(x, h, h, k, s, p, cin, 80, one[0], cols, wrow, one[1], rows, blocked[None], bias[None],
                       out_res, act=2, res=res)
    torch.testing.assert_close(out_res, want_res, rtol=1e-5, atol=1e-4)
    if out_res.numel() >= 64:  # the data exercise both clamps
        assert (out_res == 6).any() and (out_res == 0).any() and ((out_res > 0) & (out_res < 6)).any()
    if s == 1:  # pixel-vectorised kernel: outputs picked by row, weights in the plain layout
        out_px = torch.empty(ho * ho, n_out)
        plain = weight.reshape(1, 80, cin, k * k).contiguous()
        native.gconv_px_heads(x, h, h, k, p, cin, 80, one[0], cols, wrow, one[1], rows, plain, bias[None], out_px)
        torch.testing.assert_close(out_px, reference(x, h, h, w_in, bias, k, s, p, cols, rows), rtol=1e-5,
                                   atol=1e-4)
        native.gconv_px_heads(x, h, h, k, p, cin, 80, one[0], cols, wrow, one[1], rows, plain, bias[None], out_px,
                              act=2, res=res)
        torch.testing.assert_close(out_px, want_res, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
@pytest.mark.parametrize("chosen", [False, True])
@pytest.mark.parametrize("attention", [False, True])
def test_gconv_heads_matches_conv2d(k, s, p, chosen, attention):
    """All heads in one call: per-head inputs by column and weight row (one head reads nothing), chosen
    outputs (one head computes none, one all), attention (folded into the inputs of wide heads, into
    the weights of narrow ones), residual and ReLU fused; against F.conv2d per head."""
    g = torch.Generator().manual_seed(k * 10 + s + chosen + 2 * attention)
    heads, cin, per, h, cx = 3, 13, 37, 8, 20
    x = torch.randn(h * h, cx + 2, generator=g)[:, :cx]
    weight, bias = torch.randn(heads, per, cin, k, k, generator=g), torch.randn(heads, per, generator=g)
    wrows = [torch.randperm(cin, generator=g)[:n].sort().values.int() for n in (6, 0, 13)]
    cols = [torch.randperm(cx, generator=g)[:r.numel()].int() for r in wrows]
    outs = [torch.randperm(per, generator=g)[:m].sort().values.int() for m in (5, 0, per)] if chosen else None
    scales = [torch.rand(r.numel(), generator=g) + 0.5 for r in wrows] if attention else [None] * heads
    ho = (h + 2 * p - k) // s + 1
    n_out = [per] * heads if outs is None else [o.numel() for o in outs]
    res = torch.randn(ho * ho, sum(n_out) + 3, generator=g)[:, 3:]
    want, col = torch.empty(ho * ho, sum(n_out)), 0
    for i in range(heads):
        if wrows[i].numel():
            ref = reference(x, h, h, weight[i][:, wrows[i].long()], bias[i], k, s, p, cols[i],
                            None if outs is None else outs[i], scales[i])
        else:  # no input: the bias
            ref = bias[i] if outs is None else bias[i][outs[i].long()]
        want[:, col:col + n_out[i]] = ref
        col += n_out[i]
    want = (want + res).relu()
    out = torch.full((ho * ho, sum(n_out)), float("nan"))
    flat = lambda ts: torch.cat(ts) if ts else None  # noqa: E731
    blocked = torch.stack([native.blocked(wh) for wh in weight])
    native.gconv_heads(x, h, h, k, s, p, cin, per, torch.tensor([r.numel() for r in wrows], dtype=torch.int32),
                       flat(cols), flat(wrows), None if outs is None else torch.tensor(n_out, dtype=torch.int32),
                       None if outs is None else flat(outs), blocked, bias, out, act=1, res=res,
                       scale=flat(scales) if attention else None)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    if s == 1 and not attention:  # vectorised over pixels: plain weights, outputs picked by row, the planes made inside
        out.fill_(float("nan"))
        native.gconv_px_heads(x, h, h, k, p, cin, per, torch.tensor([r.numel() for r in wrows], dtype=torch.int32),
                              flat(cols), flat(wrows), None if outs is None else torch.tensor(n_out, dtype=torch.int32),
                              None if outs is None else flat(outs), weight.reshape(heads, per, cin, k * k).contiguous(),
                              bias, out, act=1, res=res)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("s,h,c", [(1, 7, 5), (2, 9, 16), (1, 6, 37), (2, 8, 37)])
def test_dwconv_matches_conv2d(s, h, c):
    g = torch.Generator().manual_seed(c + s)
    x = torch.randn(h * h, c + 4, generator=g)[:, 1:c + 1]  # a column slice: strided rows
    weight, bias = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
    want = F.conv2d(x.t().reshape(1, c, h, h), weight, bias, s, 1, 1, c).flatten(2)[0].t() * 3
    ho = (h + 2 - 3) // s + 1
    out = torch.full((ho * ho, c + 2), float("nan"))[:, 1:c + 1]
    native.dwconv(x, h, h, 3, s, 1, (weight * 3).flatten(1).t().contiguous(), bias * 3, out, act=2)
    torch.testing.assert_close(out, want.clamp(0, 6), rtol=1e-5, atol=1e-5)
    assert (out == 6).any() and (out == 0).any()


def test_generators_match_torch():
    """One C call (context mean, stacked first layers, each second layer) against the PyTorch path."""
    from msgc.deploy.ops import Generators
    from msgc.modeling.layers import AttentionGenerator, MaskGenerator

    torch.manual_seed(0)
    gens = [MaskGenerator(40, 40, 1), MaskGenerator(40, 24, 4), AttentionGenerator(40, 24, 4)]
    for g in gens:
        torch.nn.init.normal_(g.conv[3].weight)
        g.conv[1].running_mean.normal_()
        g.conv[1].running_var.uniform_(0.5, 2)
    x = torch.randn(37, 50)[:, 3:43]  # a column slice: strided rows
    want = Generators([g.eval() for g in gens])(x)
    got = Generators(gens, native=True)(x)
    assert [t.shape for t in got] == [(1, 40), (4, 24), (4, 24)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    context = x.mean(0, keepdim=True)[..., None, None]
    torch.testing.assert_close(got[1], gens[1].logits(context)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 3])
def test_head_sets_match_numpy(heads):
    from msgc.deploy.gates import _head_sets

    g = torch.Generator().manual_seed(heads)
    logits = torch.randn(heads, 20, generator=g)
    logits[0] = -1.0  # a head with every gate closed
    logits[-1, 5] = 0.0  # a logit of exactly 0 opens its channel
    logits[:, 7] = -1.0  # a channel that no head reads
    if heads > 1:
        logits[1] = 1.0  # and one with every gate open
    att = torch.randn(heads, 20, generator=g)
    got, want = native.head_sets(logits, att), _head_sets(logits, att)
    assert got[0] == want[0] == (logits >= 0).sum(1).tolist() == got[1][:heads].tolist()
    assert got[1][heads] == got[4].numel()
    for a, b in zip(got[2:], want[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    counts, _, idx, vals, union, pos = got
    assert torch.equal(union, (logits >= 0).any(0).nonzero().flatten().int())
    assert torch.equal(union[pos.long()], idx) and (heads > 1 or 7 not in union.tolist())
    torch.testing.assert_close(vals, att[logits >= 0])


def test_empty_head_outputs_bias():
    x, bias = torch.randn(16, 4), torch.randn(16)
    out = torch.empty(16, 16)
    weight = native.blocked(torch.randn(16, 4, 3, 3))
    native.gconv(x, 4, 4, 3, 1, 1, torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), weight,
                 bias, out)
    torch.testing.assert_close(out, bias.expand(16, 16))


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_without_compiler_deploy_falls_back(tmp_path):
    code = ("import torch; from msgc.deploy import native, deploy; print(native.available()); "
            "print(native.status())")
    off = _python(code, MSGC_NATIVE="0")
    assert off.stdout.split("\n")[:2] == ["False", "turned off by MSGC_NATIVE=0"], off.stderr
    broken = _python(code, CC="false", MSGC_CACHE=str(tmp_path))  # an empty cache and no working compiler
    assert broken.stdout.startswith("False\nunavailable"), broken.stdout + broken.stderr
    assert "using PyTorch's kernels" in broken.stdout


def test_native_needs_float32_cpu(cfg):
    from msgc.modeling import build_model

    cfg.MODEL.BACKBONE.NAME = "msgc_resnet18"
    cfg.MODEL.BACKBONE.WIDTH_MULT = 0.25
    cfg.MODEL.BACKBONE.STEM = "cifar"
    model = build_model(cfg).double().eval()
    with pytest.raises(ValueError, match="on the CPU in float32"):
        deploy(model, native=True)
    assert not deploy(model).backbone.blocks[0].conv2.native  # the default falls back
