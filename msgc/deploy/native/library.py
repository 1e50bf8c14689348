"""One loaded variant of the native library, with a Python call for each of its kernels.

The calls take tensors (CPU, float32, int32 indices) and fill the argument structs of :mod:`.abi`;
they serve the tests and single-op measurements. A deployed network does not go through them: its
whole per-sample program is one call (:mod:`.program`).
"""
import ctypes
from typing import Optional

import torch

from . import abi, build

__all__ = ["Library", "NativeError", "blocked"]

_S = abi.STRUCTS


class NativeError(RuntimeError):
    """A kernel refused its arguments."""


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """``out x in x k x k`` weights -> the blocked layout ``ceil(out/16) x in x k*k x 16`` (zero-padded),
    the same on every ISA."""
    out, cin = weight.size(0), weight.size(1)
    nb = (out + 15) // 16
    weight = torch.nn.functional.pad(weight.reshape(out, -1), (0, 0, 0, nb * 16 - out)).view(nb, 16, cin, -1)
    return weight.permute(0, 2, 3, 1).contiguous()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str):
    if rc < 0:
        why = {-1: "a kernel or an output count larger than it handles", -2: "out of memory",
               -3: "an inconsistent plan"}.get(rc, f"status {rc}")
        raise NativeError(f"{what}: {why}")
    return rc


class Library:
    """A variant of the kernels (``avx512``, ``avx2``, ``portable``), built and loaded."""

    def __init__(self, variant: str, csrc: Optional[str] = None):
        self.variant = variant
        self.lib = build.load(variant) if csrc is None else build.load(variant, csrc)
        info = (ctypes.c_int32 * 8)()
        self.lib.msgc_describe(ctypes.byref(_S["msgc_info"](ctypes.addressof(info))))
        self.vector_floats, self.registers, self.tile_families = info[0], info[1], info[4]

    def __repr__(self):
        return f"Library({self.variant}: {self.vector_floats} floats per vector, {self.registers} registers)"

    def conv(self, x: torch.Tensor, h: int, w: int, k: int, s: int, p: int, heads: int, in_channels: int,
             per_head: int, out: torch.Tensor, *, blocked_weight=None, plain_weight=None, rows: int = 0,
             bias=None, counts=None, cols=None, wrow=None, scale=None, ocounts=None, ocols=None, act: int = 0,
             res=None, kernel: int = 0, tiles: int = 0, bn: bool = False, threads: int = 0, xstep: int = 0) -> int:
        """Every head of a gated convolution of ``x`` (``HW x C``, rows may be strided) into ``out``
        (``msgc_conv``, arguments as in ``msgc.h``). Returns the executed MACs."""
        executed = ctypes.c_int64(0)
        a = _S["msgc_conv_args"]()
        a.g = _S["msgc_geom"](h, w, k, s, p)
        a.hd = _S["msgc_heads"](heads, in_channels, per_head, _ptr(counts), _ptr(cols), _ptr(wrow), _ptr(scale),
                                _ptr(ocounts), _ptr(ocols), xstep)
        a.wt = _S["msgc_weights"](_ptr(blocked_weight), _ptr(plain_weight), rows or in_channels, _ptr(bias), kernel,
                                  tiles)
        a.io = _S["msgc_io"](x.data_ptr(), x.stride(0), x.size(1), out.data_ptr(), out.stride(0), _ptr(res),
                             0 if res is None else res.stride(0), act)
        a.bn, a.nthreads = int(bn), threads or torch.get_num_threads()
        a.executed = ctypes.addressof(executed)
        _check(self.lib.msgc_conv(ctypes.byref(a)), f"msgc_conv ({heads} heads of {per_head}, {k}x{k})")
        return executed.value

    def dwconv(self, x, h, w, k, s, p, weight, bias, out, act=0, threads=0):
        """Depthwise ``k x k`` convolution of x's columns (weight ``k*k x C``, tap-major)."""
        a = _S["msgc_dw_args"](_S["msgc_geom"](h, w, k, s, p), x.size(1), x.data_ptr(), x.stride(0),
                               weight.data_ptr(), _ptr(bias), out.data_ptr(), out.stride(0), act,
                               threads or torch.get_num_threads())
        _check(self.lib.msgc_dwconv(ctypes.byref(a)), f"msgc_dwconv ({k}x{k})")

    def generators(self, x, w1, b1, desc, w2, b2, threads=0):
        """Every generator's logits on the context of x, concatenated (``msgc_generators``)."""
        out = torch.empty(b2.numel())
        a = _S["msgc_gen_args"](x.data_ptr(), x.stride(0), x.size(0), x.size(1), w1.data_ptr(), b1.data_ptr(),
                                w1.size(0), desc.size(0), desc.data_ptr(), desc.size(1), w2.data_ptr(), b2.data_ptr(),
                                out.data_ptr(), threads or torch.get_num_threads())
        _check(self.lib.msgc_generators(ctypes.byref(a)), "msgc_generators")
        return out

    def head_sets(self, logits: Optional[torch.Tensor], heads: int, channels: int, att=None, groups: int = 0,
                  host_groups: int = 1):
        """The index sets of a ``heads x channels`` gate matrix (``msgc_head_sets``) -> dict of tensors
        ``counts`` (heads + 1), ``idx``, ``pos``, ``uni``, ``vals`` (with att), ``gcounts``/``gidx``
        (with groups), ``hcounts``/``hidx``/``hrow``/``hpos``/``hvals`` (with host groups)."""
        n = heads * channels

        def ints(k):
            return torch.empty(max(k, 1), dtype=torch.int32)

        counts, idx, pos, uni, gcounts, gidx = ints(heads + 1), ints(n), ints(n), ints(channels), ints(groups), ints(n)
        hcounts, hidx, hrow, hpos = ints(heads * host_groups), ints(n), ints(n), ints(n)
        vals = torch.empty(n) if att is not None else None
        hvals = torch.empty(n) if att is not None else None
        a = _S["msgc_sets_args"](_ptr(logits), heads, channels, _ptr(att), counts.data_ptr(), idx.data_ptr(),
                                 _ptr(vals), uni.data_ptr(), pos.data_ptr(), groups, gcounts.data_ptr(),
                                 gidx.data_ptr(), host_groups, hcounts.data_ptr(), hidx.data_ptr(), hrow.data_ptr(),
                                 hpos.data_ptr(), _ptr(hvals))
        nu = _check(self.lib.msgc_head_sets(ctypes.byref(a)), "msgc_head_sets")
        total = int(counts[:heads].sum())
        out = {"counts": counts, "idx": idx[:total], "pos": pos[:total], "uni": uni[:nu]}
        if vals is not None:
            out["vals"] = vals[:total]
        if groups:
            out["gcounts"], out["gidx"] = gcounts[:groups], gidx[:total]
        if host_groups > 1:
            out.update(hcounts=hcounts[:heads * host_groups], hidx=hidx[:total], hrow=hrow[:total], hpos=hpos[:total])
            if hvals is not None:
                out["hvals"] = hvals[:total]
        return out

    def fma_peak(self, iters: int = 2_000_000, reps: int = 5) -> float:
        """This variant's multiply-add peak on the calling thread, in GMAC/s: the fastest of ``reps``
        timings of ``iters`` rounds of 12 independent vector FMAs held in registers (``msgc_fma_peak``).
        The fastest, because another process can only slow a repetition down."""
        times = (ctypes.c_int64 * reps)()
        macs, sink = ctypes.c_int64(0), ctypes.c_float(0.0)
        a = _S["msgc_peak_args"](iters, reps, ctypes.addressof(times), ctypes.addressof(macs), ctypes.addressof(sink))
        _check(self.lib.msgc_fma_peak(ctypes.byref(a)), "msgc_fma_peak")
        return macs.value / max(1, min(times))

    def run(self, args) -> None:
        """Run a program (an ``msgc_run_args`` struct, see :mod:`.program`)."""
        _check(self.lib.msgc_run(ctypes.byref(args)), "msgc_run")
