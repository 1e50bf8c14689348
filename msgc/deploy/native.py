"""The deployed networks' CPU kernels (``csrc/gconv.c``): built on first use, called through ctypes.

A gated convolution reads a different subset of input channels for every sample and head, so its
shapes change with every sample. oneDNN builds (and caches) a kernel per shape and reorders every new
weight tensor into its blocked layout, which costs more than the convolution itself at 14x14 and 7x7;
gathering the open channels' inputs and weights first costs more memory traffic than the MACs it saves
there (see the README's "Speed" section). ``msgc_gconv`` instead reads the open channels by index,
in place, from weights stored input-channel first, and has no per-shape setup.

The C file is compiled once per machine with ``$CC`` (default ``cc``), ``-O3 -march=native -fopenmp``,
into ``$MSGC_CACHE`` (default ``~/.cache/msgc``), under a name that hashes the source, the flags and
the CPU, and loaded with ctypes; OpenMP is the runtime PyTorch has already loaded. Where no compiler
works, :func:`available` is False (with the reason in :func:`status`) and deployment uses PyTorch's
kernels instead. ``MSGC_NATIVE=0`` turns the kernels off.
"""
import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from typing import Optional

import torch
from torch.nn import functional as F

__all__ = ["available", "status", "gconv", "blocked", "generators",
           "head_sets", "dwconv", "gconv_heads", "gconv_px_heads"]

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "gconv.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu99"]
_lock = threading.Lock()
_lib = None
_status = "not loaded yet"

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> str:
    with open(_SOURCE, "rb") as f:
        source = f.read()
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(source + " ".join([cc] + _FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    cache = os.path.expanduser(os.environ.get("MSGC_CACHE", os.path.join("~", ".cache", "msgc")))
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:  # a read-only home: build per user in the temp folder instead
        cache = os.path.join(tempfile.gettempdir(), f"msgc-{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"gconv-{key}.so")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *_FLAGS, _SOURCE, "-o", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
            os.replace(tmp, path)  # atomic: concurrent builders each write their own temp file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def _load():
    global _lib, _status
    with _lock:
        if _lib is not None or _status != "not loaded yet":
            return
        if os.environ.get("MSGC_NATIVE", "1") == "0":
            _status = "turned off by MSGC_NATIVE=0"
            return
        try:
            lib = ctypes.CDLL(_build())
            lib.msgc_gconv.argtypes = [_P, _L, _I, _I, _I, _I, _I, _P, _P, _I, _P, _L, _P, _P, _L, _P, _L, _I, _I, _I]
            lib.msgc_gconv.restype = _I
            lib.msgc_generators.argtypes = [_P, _L, _I, _I, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _I]
            lib.msgc_generators.restype = None
            lib.msgc_head_sets.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P]
            lib.msgc_head_sets.restype = _I
            lib.msgc_dwconv.argtypes = [_P, _L, _I, _I, _I, _I, _I, _I, _P, _P, _P, _L, _I, _I]
            lib.msgc_dwconv.restype = _I
            lib.msgc_gconv_heads.argtypes = [_P, _L, _I, _I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _I, _P,
                                             _L, _P, _P, _L, _P, _L, _I, _I]
            lib.msgc_gconv_heads.restype = _I
            lib.msgc_gconv_px_heads.argtypes = [_P, _L, _I, _I, _I, _I, _I, _I, _P, _I, _P, _P, _P, _P, _P, _I,
                                                _P, _L, _P, _P, _L, _P, _L, _I, _I]
            lib.msgc_gconv_px_heads.restype = _I
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _status = f"unavailable ({e}); using PyTorch's kernels"
            logger.warning("msgc.deploy: native kernels %s", _status)
            return
        _lib, _status = lib, "loaded"


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call)."""
    _load()
    return _lib is not None


def status() -> str:
    _load()
    return _status


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """``out x in x k x k`` weights -> the kernels' layout ``ceil(out/16) x in x k*k x 16`` (zero-padded)."""
    out, cin = weight.size(0), weight.size(1)
    nb = (out + 15) // 16
    weight = F.pad(weight.reshape(out, -1), (0, 0, 0, nb * 16 - out)).view(nb, 16, cin, -1)
    return weight.permute(0, 2, 3, 1).contiguous()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def gconv(x: torch.Tensor, h: int, w: int, k: int, s: int, p: int, idx: Optional[torch.Tensor],
          wrow: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
          out: torch.Tensor, act: int = 0, res: Optional[torch.Tensor] = None) -> None:
    """Write a gathered k x k convolution of one sample into ``out`` (see ``msgc_gconv``).

    Args:
        x: ``HW x C`` float32 matrix (rows may be strided: a column slice of a wider one).
        idx: int32 open channels (columns of x) in reading order, or None for x's first n columns.
        wrow: int32 weight row of each open channel, or None for rows 0..n-1 (weights already gathered).
        weight: :func:`blocked` weights, ``ceil(C_out/16) x rows x k*k x 16``.
        bias: ``>= out.size(1)`` float32 or None.
        out: ``HoWo x ncol`` matrix (rows may be strided), written in full.
        act: activation applied on the way out: 0 none, 1 ReLU, 2 ReLU6.
        res: ``HoWo x ncol`` matrix (rows may be strided) added before the activation, or None.
    """
    n = x.size(1) if idx is None else idx.numel()
    rc = _lib.msgc_gconv(x.data_ptr(), x.stride(0), h, w, k, s, p, _ptr(idx), _ptr(wrow), n,
                         weight.data_ptr(), weight.size(1), _ptr(bias), out.data_ptr(), out.stride(0),
                         _ptr(res), 0 if res is None else res.stride(0), out.size(1), act, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"gconv: {out.size(1)} output channels or a {k}x{k} kernel are more than it handles")


def generators(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, desc: torch.Tensor, w2: torch.Tensor,
               b2: torch.Tensor) -> torch.Tensor:
    """A block's generators on the context of ``x`` (``HW x C``, rows may be strided): the logits of
    every generator, concatenated (see ``msgc_generators``).

    ``w1``: ``hidden x C`` stacked first layers, ``b1`` their biases; ``desc``: int64 ``generators x 5``
    (rows, first hidden unit, hidden units, first output, first weight) into the packed second layers
    ``w2`` (flat) and ``b2`` (one per output row).
    """
    nh, c = w1.shape
    scratch = torch.empty(c + nh + b2.numel())
    out = scratch[c + nh:]
    _lib.msgc_generators(x.data_ptr(), x.stride(0), x.size(0), c, w1.data_ptr(), b1.data_ptr(), nh,
                         desc.size(0), desc.data_ptr(), w2.data_ptr(), b2.data_ptr(), scratch.data_ptr(),
                         scratch.data_ptr() + 4 * c, out.data_ptr(), torch.get_num_threads())
    return out


def head_sets(logits: torch.Tensor, att: Optional[torch.Tensor] = None):
    """A ``heads x C`` gate matrix (open where the logit is >= 0) -> ``(counts, counts_t, idx, vals,
    union, pos)`` (see ``msgc_head_sets``): counts a list and counts_t the same as an int32 tensor
    (with the size of union after them),
    idx/union/pos int32 tensors (idx and pos flat, head after head), vals the attention of each idx
    entry (float32, or None without ``att``)."""
    heads, c = logits.shape
    buf = torch.empty(heads + 1 + c + 2 * heads * c, dtype=torch.int32)
    counts, uni = buf[:heads + 1], buf[heads + 1:heads + 1 + c]
    idx, pos = buf[heads + 1 + c:heads + 1 + c + heads * c], buf[heads + 1 + c + heads * c:]
    vals = None if att is None else torch.empty(heads * c)
    nu = _lib.msgc_head_sets(logits.data_ptr(), heads, c, _ptr(att), counts.data_ptr(), idx.data_ptr(),
                             _ptr(vals), uni.data_ptr(), pos.data_ptr())
    sizes = counts.tolist()[:heads]
    n = sum(sizes)
    return sizes, counts, idx[:n], None if vals is None else vals[:n], uni[:nu], pos[:n]


def dwconv(x: torch.Tensor, h: int, w: int, k: int, s: int, p: int, weight: torch.Tensor,
           bias: Optional[torch.Tensor], out: torch.Tensor, act: int = 0) -> None:
    """A k x k (k <= 3) depthwise convolution of the columns of ``x`` (``HW x C``, rows may be strided)
    into ``out`` (``HoWo x C``); ``weight``: ``k*k x C`` (tap-major, contiguous), ``act`` as in :func:`gconv`."""
    rc = _lib.msgc_dwconv(x.data_ptr(), x.stride(0), h, w, x.size(1), k, s, p, weight.data_ptr(), _ptr(bias),
                          out.data_ptr(), out.stride(0), act, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"dwconv: a {k}x{k} kernel is larger than it handles (3x3)")


def gconv_heads(x: torch.Tensor, h: int, w: int, k: int, s: int, p: int, in_channels: int, per_head: int,
                counts: Optional[torch.Tensor], cols: Optional[torch.Tensor], wrow: Optional[torch.Tensor],
                ocounts: Optional[torch.Tensor], ocols: Optional[torch.Tensor], weight: torch.Tensor,
                bias: Optional[torch.Tensor], out: torch.Tensor, act: int = 0, res: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None) -> None:
    """Every head of a gated convolution in one call (see ``msgc_gconv_heads``).

    ``weight``: ``heads x blocks x rows x k*k x 16`` (:func:`blocked` per head), ``bias``: ``heads x
    per_head`` or None. ``counts``/``ocounts``: int32 inputs/outputs per head (None: ``in_channels``/
    ``per_head`` each); ``cols``/``wrow``/``ocols``: flat int32, head after head (None: 0, 1, ... per
    head); ``scale``: flat float32 attention of each input entry, or None. ``out``: ``HoWo x
    sum(outputs)``; ``act`` and ``res`` as in :func:`gconv`.
    """
    heads, rows = weight.size(0), weight.size(2)
    rc = _lib.msgc_gconv_heads(x.data_ptr(), x.stride(0), h, w, k, s, p, heads, _ptr(counts), in_channels,
                               _ptr(cols), _ptr(wrow), _ptr(scale), _ptr(ocounts), _ptr(ocols), per_head,
                               weight.data_ptr(), rows, _ptr(bias), out.data_ptr(), out.stride(0), _ptr(res),
                               0 if res is None else res.stride(0), act, torch.get_num_threads())
    if rc != 0:
        raise (MemoryError if rc == -2 else ValueError)(
            f"gconv_heads: failed ({rc}) for {heads} heads of {per_head} outputs, {k}x{k}")


def gconv_px_heads(x: torch.Tensor, h: int, w: int, k: int, p: int, in_channels: int, per_head: int,
                   counts: Optional[torch.Tensor], cols: Optional[torch.Tensor], wrow: Optional[torch.Tensor],
                   ocounts: Optional[torch.Tensor], ocols: Optional[torch.Tensor], weight: torch.Tensor,
                   bias: Optional[torch.Tensor], out: torch.Tensor, act: int = 0,
                   res: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> None:
    """Every head of a narrow stride-1 convolution in one call, vectorised over pixels (see
    ``msgc_gconv_px_heads``): the planes of ``x`` are made inside (scaled per head with attention).
    ``weight``: ``heads x per_head x rows x k*k`` (plain); the other arguments as in :func:`gconv_heads`."""
    rc = _lib.msgc_gconv_px_heads(x.data_ptr(), x.stride(0), h, w, x.size(1), k, p, weight.size(0), _ptr(counts),
                                  in_channels, _ptr(cols), _ptr(wrow), _ptr(scale), _ptr(ocounts), _ptr(ocols),
                                  per_head, weight.data_ptr(), weight.size(2), _ptr(bias), out.data_ptr(),
                                  out.stride(0), _ptr(res), 0 if res is None else res.stride(0), act,
                                  torch.get_num_threads())
    if rc != 0:
        raise (MemoryError if rc == -2 else ValueError)(f"gconv_px_heads: failed ({rc}), {k}x{k}")
