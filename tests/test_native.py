"""msgc.deploy.native: every kernel variant this CPU runs against PyTorch, the interface check, the
build cache, and the fallback without a compiler."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from msgc.deploy import native
from msgc.deploy.native import abi, build
from msgc.deploy.reference import head_sets as numpy_head_sets

VARIANTS = native.variants()
pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


@pytest.fixture(scope="module", params=VARIANTS)
def lib(request):
    return native.library(request.param)


def reference(x, h, w, weight, bias, k, s, p, cols, rows, scale=None):
    """The gathered convolution with PyTorch: x (HW x C) columns ``cols`` -> outputs ``rows``."""
    image = x.t().reshape(1, -1, h, w)[:, cols.long()]
    wt = weight if rows is None else weight[rows.long()]
    if scale is not None:
        image = image * scale.view(1, -1, 1, 1)
    b = None if bias is None else (bias if rows is None else bias[rows.long()])
    return F.conv2d(image, wt, b, s, p).flatten(2)[0].t()


def _kernels(lib, s):
    """(kernel, tile family) of every candidate for a stride."""
    out = [(kernel, f + order) for kernel in (0, 2, 3) for f in range(lib.tile_families)  # in place / on copied
           for order in (0, 16)]  # inputs / heads packed; chunk- / pixel-major
    return out + ([(1, 0)] if s == 1 else [])


@pytest.mark.parametrize("k,s,p,h", [(3, 1, 1, 9), (3, 2, 1, 9), (1, 1, 0, 6), (1, 2, 0, 7), (3, 1, 1, 2)])
@pytest.mark.parametrize("n_out", [1, 5, 8, 17, 33, 70])
def test_conv_matches_conv2d(lib, k, s, p, h, n_out):
    """One head reading 7 of 23 columns (in any order) through 7 of 11 weight rows: all outputs or
    ``n_out`` chosen ones, with attention, a residual (strided rows) and ReLU6, for every kernel and tile
    family of the variant."""
    g = torch.Generator().manual_seed(n_out * 7 + k)
    cin, cx = 11, 23
    x = torch.randn(h * h, cx + 3, generator=g)[:, :cx]  # a column slice: strided rows
    weight, bias = torch.randn(80, cin, k, k, generator=g), torch.randn(80, generator=g)
    wrow = torch.randperm(cin, generator=g)[:7].sort().values.int()
    cols = torch.randperm(cx, generator=g)[:7].int()
    rows = torch.randperm(80, generator=g)[:n_out].int()
    scale = torch.rand(7, generator=g)
    w_in = weight[:, wrow.long()]
    ho = (h + 2 * p - k) // s + 1
    one = torch.tensor([7], dtype=torch.int32)
    weights = dict(blocked_weight=native.blocked(weight), plain_weight=weight.reshape(80, cin, k * k).contiguous(),
                   bias=bias, counts=one, cols=cols, wrow=wrow)
    res = torch.randn(ho * ho, 85, generator=g)[:, 2:82] * 4
    for kernel, tiles in _kernels(lib, s):
        for chosen in (False, True):
            m = n_out if chosen else 80
            sel = dict(ocounts=torch.tensor([n_out], dtype=torch.int32), ocols=rows) if chosen else {}
            want = reference(x, h, h, w_in, bias, k, s, p, cols, rows if chosen else None, scale)
            out = torch.full((ho * ho, m + 2), float("nan"))[:, 1:m + 1]
            lib.conv(x, h, h, k, s, p, 1, cin, 80, out, scale=scale, kernel=kernel, tiles=tiles, **weights, **sel)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
            want = (reference(x, h, h, w_in, bias, k, s, p, cols, rows if chosen else None) + res[:, :m]).clamp(0, 6)
            lib.conv(x, h, h, k, s, p, 1, cin, 80, out, act=2, res=res[:, :m], kernel=kernel, tiles=tiles,
                     **weights, **sel)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
            if out.numel() >= 64:  # the data exercise both clamps
                assert (out == 6).any() and (out == 0).any() and ((out > 0) & (out < 6)).any()


@pytest.mark.parametrize("k,s,p,h", [(7, 2, 3, 37), (3, 2, 1, 40), (3, 1, 1, 29)])
def test_few_input_channels_match_conv2d(lib, k, s, p, h):
    """A stem: 3 input channels, so the wide kernel walks its taps by kernel rows (a row's taps and
    channels side by side) where a tile's rows of taps lie inside the image; maps wide enough for
    tiles inside and across the edges; every kernel and tile family."""
    g = torch.Generator().manual_seed(k * 100 + h)
    x = torch.randn(h * h, 5, generator=g)[:, 1:4]  # strided rows
    weight, bias = torch.randn(64, 3, k, k, generator=g), torch.randn(64, generator=g)
    want = F.conv2d(x.t().reshape(1, 3, h, h), weight, bias, s, p).flatten(2)[0].t().relu()
    ho = (h + 2 * p - k) // s + 1
    for kernel, tiles in _kernels(lib, s):
        out = torch.full((ho * ho, 64), float("nan"))
        lib.conv(x, h, h, k, s, p, 1, 3, 64, out, blocked_weight=native.blocked(weight),
                 plain_weight=weight.reshape(64, 3, k * k).contiguous(), bias=bias, act=1, kernel=kernel, tiles=tiles)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,s,p,h", [(3, 1, 1, 8), (3, 2, 1, 8), (1, 1, 0, 8), (3, 1, 1, 40), (3, 2, 1, 37)])
@pytest.mark.parametrize("chosen", [False, True])
@pytest.mark.parametrize("attention", [False, True])
def test_heads_match_conv2d(lib, k, s, p, h, chosen, attention):
    """Three heads in one call: inputs by column and weight row (one head reads nothing), chosen outputs
    (one head computes none, one all), attention (folded into the inputs of wide heads, into the weights
    of narrow ones), residual and ReLU; every kernel; against F.conv2d per head. Wide maps have whole
    tiles inside one output row, whose inputs the wide kernel reads a fixed stride apart."""
    g = torch.Generator().manual_seed(k * 10 + s + chosen + 2 * attention + h)
    heads, cin, per, cx = 3, 13, 37, 20
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
    blocked = torch.stack([native.blocked(wh) for wh in weight])
    plain = weight.reshape(heads, per, cin, k * k).contiguous()
    args = dict(blocked_weight=blocked, plain_weight=plain, bias=bias,
                counts=torch.tensor([r.numel() for r in wrows], dtype=torch.int32), cols=torch.cat(cols),
                wrow=torch.cat(wrows), scale=torch.cat(scales) if attention else None, act=1, res=res)
    if outs is not None:
        args.update(ocounts=torch.tensor(n_out, dtype=torch.int32), ocols=torch.cat(outs))
    for kernel, tiles in _kernels(lib, s):
        out = torch.full((ho * ho, sum(n_out)), float("nan"))
        executed = lib.conv(x, h, h, k, s, p, heads, cin, per, out, kernel=kernel, tiles=tiles, **args)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
        assert executed >= ho * ho * sum(m * r.numel() * k * k for m, r in zip(n_out, wrows))


@pytest.mark.parametrize("s,h,c", [(1, 7, 5), (2, 9, 16), (1, 6, 37), (2, 8, 37)])
def test_dwconv_matches_conv2d(lib, s, h, c):
    g = torch.Generator().manual_seed(c + s)
    x = torch.randn(h * h, c + 4, generator=g)[:, 1:c + 1]  # a column slice: strided rows
    weight, bias = torch.randn(c, 1, 3, 3, generator=g), torch.randn(c, generator=g)
    want = F.conv2d(x.t().reshape(1, c, h, h), weight, bias, s, 1, 1, c).flatten(2)[0].t() * 3
    ho = (h + 2 - 3) // s + 1
    out = torch.full((ho * ho, c + 2), float("nan"))[:, 1:c + 1]
    lib.dwconv(x, h, h, 3, s, 1, (weight * 3).flatten(1).t().contiguous(), bias * 3, out, act=2)
    torch.testing.assert_close(out, want.clamp(0, 6), rtol=1e-5, atol=1e-5)
    assert (out == 6).any() and (out == 0).any()


def test_generators_match_torch(lib):
    """One C call (context mean, stacked first layers, each second layer) against the generators."""
    from msgc.deploy.fold import FoldedGenerators
    from msgc.modeling.layers import AttentionGenerator, MaskGenerator

    torch.manual_seed(0)
    gens = [MaskGenerator(40, 40, 1), MaskGenerator(40, 24, 4), AttentionGenerator(40, 24, 4)]
    for gen in gens:
        torch.nn.init.normal_(gen.second.weight)
        gen.norm.running_mean.normal_()
        gen.norm.running_var.uniform_(0.5, 2)
        gen.eval()
    f = FoldedGenerators.of(gens)
    x = torch.randn(37, 50)[:, 3:43]  # a column slice: strided rows
    got = lib.generators(x, f.w1, f.b1, f.desc, f.w2, f.b2)
    context = x.mean(0, keepdim=True)[..., None, None]
    want = torch.cat([gen.logits(context).flatten() for gen in gens])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 3])
def test_head_sets_match_numpy(lib, heads):
    g = torch.Generator().manual_seed(heads)
    logits = torch.randn(heads, 20, generator=g)
    if heads > 1:
        logits[1] = 1.0  # a head with every other gate open
    logits[0] = -1.0  # a head with every gate closed
    logits[-1, 5] = 0.0  # a logit of exactly 0 opens its channel
    logits[:, 7] = -1.0  # a channel that no head reads
    att = torch.randn(heads, 20, generator=g)
    got = lib.head_sets(logits, heads, 20, att)
    want = numpy_head_sets(logits, heads, 20, att)
    assert got["counts"][:heads].tolist() == want["counts"] == (logits >= 0).sum(1).tolist()
    assert got["counts"][heads] == got["uni"].numel() == want["n_uni"]
    assert torch.equal(got["idx"].long(), torch.cat(want["idx"]))
    assert torch.equal(got["pos"].long(), torch.cat(want["pos"]))
    assert torch.equal(got["uni"].long(), want["uni"])
    torch.testing.assert_close(got["vals"], torch.cat(want["vals"]))
    assert torch.equal(got["uni"][got["pos"].long()], got["idx"]) and 7 not in got["uni"].tolist()
    # one head over 4 groups: each group's open channels, numbered within it
    one = lib.head_sets(logits[-1:], 1, 20, groups=4)
    want = numpy_head_sets(logits[-1:], 1, 20, None, groups=4)
    assert one["gcounts"].tolist() == want["gcounts"]
    assert torch.equal(one["gidx"].long(), torch.cat(want["gidx"]))


def test_every_variant_this_cpu_runs_is_tested():
    """x86-64 machines run the AVX2 and portable builds next to the best one (AVX-512 where present)."""
    runnable = build.cpu_variants()
    assert list(runnable) == VARIANTS and VARIANTS[-1] == "portable"
    for v in VARIANTS:
        assert native.library(v).lib.msgc_isa().decode() in (v, "neon")
    if "avx2" in build.VARIANTS:
        assert native.library("portable").vector_floats == 4
        if "avx2" in runnable:
            assert native.library("avx2").vector_floats == 8


def test_fma_peak_of_every_variant():
    """Each variant's register-resident FMA loop gives a finite rate above a scalar core's (one multiply-add
    per cycle at 1 GHz), and a vector build is no slower than the portable one (4 floats, SSE2 on x86-64)."""
    import math

    peaks = native.fma_peaks()
    assert list(peaks) == VARIANTS
    for v, gmacs in peaks.items():
        assert math.isfinite(gmacs) and gmacs > 1.0, (v, gmacs)
    for v in VARIANTS[:-1]:  # the busy machine's noise stays far below the factor of 2-4 expected
        assert peaks[v] > 0.8 * peaks["portable"], peaks
    with pytest.raises(native.NativeError, match="msgc_fma_peak"):
        native.library(VARIANTS[-1]).fma_peak(iters=0)


def test_avx512_builds_even_where_it_cannot_run(tmp_path, monkeypatch):
    """Compiled here whatever the CPU (it is only loaded where the CPU has AVX-512)."""
    if "avx512" not in build.VARIANTS:
        pytest.skip("not an x86-64 machine")
    monkeypatch.setenv("MSGC_CACHE", str(tmp_path))
    path = build.build("avx512")
    assert os.path.getsize(path) > 10000
    if "avx512" not in build.cpu_variants():
        with pytest.raises(build.BuildError, match="cannot run the avx512 kernels"):
            native.Library("avx512")


def test_an_interface_changed_on_one_side_is_caught(tmp_path, monkeypatch):
    """A field added to a C struct (not to native/abi.py) is caught at load time, before any call."""
    monkeypatch.setenv("MSGC_CACHE", str(tmp_path / "cache"))
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    header = (csrc / "msgc.h").read_text()
    changed = header.replace("#define MSGC_GEOM(X) X(i32, h) X(i32, w)",
                             "#define MSGC_GEOM(X) X(i32, h) X(i32, d) X(i32, w)")
    assert changed != header
    (csrc / "msgc.h").write_text(changed)
    with pytest.raises(abi.AbiMismatch, match="msgc_geom"):
        native.Library("portable", csrc=str(csrc))
    # the other side: a Python declaration that drifted from the library's
    monkeypatch.setattr(abi, "FIELDS", [(n, s.replace("i64 ldx", "i32 ldx")) for n, s in abi.FIELDS])
    with pytest.raises(abi.AbiMismatch, match="differs"):
        abi.check(native.library("portable").lib)


def test_a_foreign_cache_file_is_not_loaded(tmp_path, monkeypatch):
    """A cached library built for another instruction set under this variant's name is refused."""
    monkeypatch.setenv("MSGC_CACHE", str(tmp_path))
    if len(build.cpu_variants()) < 2:
        pytest.skip("this CPU runs one variant only")
    best, portable = build.cpu_variants()[0], build.build("portable")
    target = build.build(best)
    shutil.copy(portable, target)  # what a shared cache written by another machine could hold
    with pytest.raises(build.BuildError, match=f"built for portable, not {best}"):
        build.load(best)


_SELFTEST = os.path.join(os.path.dirname(__file__), "csrc", "selftest.c")
#: builds Python cannot load here, checked by the C self-test under user-mode emulation
_CROSS = {"neon": (["aarch64-linux-gnu-gcc"], ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"])}


def _selftest(tmp_path, cc, flags, run=()):
    src = build.CSRC
    exe = str(tmp_path / "selftest")
    kernels = [os.path.join(src, f) for f in build.KERNEL_SOURCES]
    subprocess.run([*cc, "-O2", "-pthread", "-std=gnu11", f"-I{src}", _SELFTEST, *kernels, *flags, "-lm", "-o", exe],
                   check=True, capture_output=True, text=True)
    return subprocess.run([*run, exe], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("variant", VARIANTS)
def test_c_selftest(tmp_path, variant):
    """The C self-test (every kernel against a plain reference) passes natively, so that its verdict
    on an emulated build means something."""
    out = _selftest(tmp_path, [build.compiler()], build.VARIANTS[variant])
    assert out.returncode == 0 and out.stdout.strip() == f"ok {variant}", out.stdout + out.stderr


@pytest.mark.parametrize("isa", sorted(_CROSS))
def test_c_selftest_of_another_architecture(tmp_path, isa):
    """AArch64 NEON: cross-compiled and run under qemu-aarch64 (Debian's gcc-aarch64-linux-gnu and
    qemu-user; skipped where they are missing)."""
    cc, run = _CROSS[isa]
    if not shutil.which(cc[0]) or not shutil.which(run[0]):
        pytest.skip(f"{cc[0]} or {run[0]} not installed")
    out = _selftest(tmp_path, cc, [], run)
    assert out.returncode == 0 and out.stdout.strip() == f"ok {isa}", out.stdout + out.stderr


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


def test_status_names_the_instruction_set():
    assert native.status().startswith(f"loaded: {VARIANTS[0]} (")


def test_native_needs_float32_cpu(cfg):
    from msgc.deploy import deploy
    from msgc.modeling import build_model

    cfg.MODEL.BACKBONE.NAME = "msgc_resnet18"
    cfg.MODEL.BACKBONE.WIDTH_MULT = 0.25
    cfg.MODEL.BACKBONE.STEM = "cifar"
    model = build_model(cfg).double().eval()
    with pytest.raises(ValueError, match="on the CPU in float32"):
        deploy(model, native=True)
    assert not deploy(model).native  # the default falls back
