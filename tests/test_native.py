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
    gathered = native.gather_weights(blocked, wrow, rows, n_out, scale)
    out = torch.full((ho * ho, n_out + 2), float("nan"))[:, 1:n_out + 1]
    native.gconv(x, h, h, k, s, p, cols, None, gathered, bias[rows.long()], out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    # in place (no gather): all outputs, weight rows by index
    want_all = reference(x, h, h, w_in, bias, k, s, p, cols, None)
    out_all = torch.empty(ho * ho, 80)
    native.gconv(x, h, h, k, s, p, cols, wrow, blocked, bias, out_all, relu=True)
    torch.testing.assert_close(out_all, want_all.relu(), rtol=1e-5, atol=1e-4)
    if s == 1:  # pixel-vectorised kernel: outputs picked by row, weights in the plain layout
        planes = native.planar(x, h, h, p)
        out_px = torch.empty(ho * ho, n_out)
        native.gconv_px(planes, h, h, k, p, cols, wrow, weight.reshape(80, cin, k * k).contiguous(), rows,
                        bias, out_px)
        torch.testing.assert_close(out_px, reference(x, h, h, w_in, bias, k, s, p, cols, rows), rtol=1e-5,
                                   atol=1e-4)


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
