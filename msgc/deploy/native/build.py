"""Building and loading the native library: one build per instruction-set variant, cached per machine.

Variants (x86-64): ``avx512`` (``-march=x86-64-v4``), ``avx2`` (``-march=x86-64-v3``: AVX2, FMA) and
``portable`` (the compiler's baseline: SSE2); elsewhere ``portable`` only (NEON on AArch64). Each is
compiled with explicit flags, never ``-march=native``, so a cached build is valid on every CPU that
has its instruction set, and the choice is made by asking the CPU (a tiny probe built with baseline
flags) before any variant is loaded: a library that would fault is never called. The cache name hashes
the sources, the compiler and the flags; a loaded library must report the variant it was asked for
and the interface of :mod:`.abi`, else it is not used.
"""
import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from typing import Dict, List, Tuple

from . import abi

__all__ = ["VARIANTS", "CSRC", "KERNEL_SOURCES", "BuildError", "cache_dir", "compiler", "cpu_variants", "build", "load"]

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
KERNEL_SOURCES = ["wide.c", "pixel.c", "conv.c", "packed.c", "depthwise.c", "gates.c", "program.c", "pool.c",
                  "scratch.c", "peak.c", "abi.c"]
_HEADERS = ["msgc.h", "simd.h", "internal.h"]
_COMMON = ["-O3", "-pthread", "-shared", "-fPIC", "-std=gnu11"]

_X86 = platform.machine().lower() in ("x86_64", "amd64")

#: variant -> its compiler flags, best first
VARIANTS: Dict[str, List[str]] = (
    {"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "portable": []} if _X86 else {"portable": []})

_PROBE = r"""
int msgc_cpu_level(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2")))
    return 1;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return 4;
  return 3;
#else
  return 0;
#endif
}
"""


class BuildError(RuntimeError):
    """The compiler failed, or the library it made is not usable."""


def compiler() -> str:
    return os.environ.get("CC", "cc")


def cache_dir() -> str:
    """Where builds and plans are cached: $MSGC_CACHE, ~/.cache/msgc, or a per-user temp folder."""
    cache = os.path.expanduser(os.environ.get("MSGC_CACHE", os.path.join("~", ".cache", "msgc")))
    try:
        os.makedirs(cache, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    # a read-only home: per user in the temp folder
    cache = os.path.join(tempfile.gettempdir(), f"msgc-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(cache, exist_ok=True)
    return cache


def _compile(sources: List[str], flags: List[str], name: str, text: bytes, libs: List[str] = ()) -> str:
    """Compile into the cache (atomically: concurrent builders each write their own temp file)."""
    key = hashlib.sha256(text + " ".join([compiler()] + flags).encode()).hexdigest()[:16]
    cache = cache_dir()
    path = os.path.join(cache, f"{name}-{key}.so")
    if os.path.exists(path):
        return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([compiler(), *flags, *sources, "-o", tmp, *libs], capture_output=True, text=True)
        except OSError as e:
            raise BuildError(f"cannot run the C compiler {compiler()!r} ({e})") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise BuildError(f"{compiler()} failed: {last}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.lru_cache(maxsize=None)
def cpu_variants() -> Tuple[str, ...]:
    """The variants this CPU can run, best first (asks the CPU through a probe built with baseline flags)."""
    if not _X86:
        return ("portable",)
    src = os.path.join(cache_dir(), "cpu_probe.c")
    if not os.path.exists(src):
        fd, tmp = tempfile.mkstemp(suffix=".c", dir=os.path.dirname(src))
        with os.fdopen(fd, "w") as f:
            f.write(_PROBE)
        os.replace(tmp, src)
    lib = ctypes.CDLL(_compile([src], ["-O1", "-shared", "-fPIC"], "cpu_probe", _PROBE.encode()))
    level = lib.msgc_cpu_level()
    return tuple(v for v, need in (("avx512", 4), ("avx2", 3), ("portable", 0)) if level >= need)


def _sources_text(csrc: str) -> bytes:
    text = b""
    for f in _HEADERS + KERNEL_SOURCES:
        with open(os.path.join(csrc, f), "rb") as fh:
            text += f.encode() + fh.read()
    return text


def build(variant: str, csrc: str = CSRC) -> str:
    """The path of the variant's library (compiled from the sources in ``csrc`` on first use)."""
    if variant not in VARIANTS:
        raise BuildError(f"unknown kernel variant {variant!r}; this machine builds {', '.join(VARIANTS)}")
    return _compile([os.path.join(csrc, f) for f in KERNEL_SOURCES], _COMMON + VARIANTS[variant], f"msgc-{variant}",
                    _sources_text(csrc), ["-lm"])


def load(variant: str, csrc: str = CSRC) -> ctypes.CDLL:
    """Build and load a variant the CPU can run; check what it reports before use."""
    if variant not in cpu_variants():
        raise BuildError(f"this CPU cannot run the {variant} kernels (it runs {', '.join(cpu_variants())})")
    path = build(variant, csrc)
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:  # a damaged cache file: build it again once
        os.remove(path)
        try:
            lib = ctypes.CDLL(build(variant, csrc))
        except OSError:
            raise BuildError(f"cannot load {path}: {e}") from None
    abi.check(lib)
    abi.bind(lib)
    built_for = lib.msgc_isa().decode()
    expected = "neon" if variant == "portable" and platform.machine().lower() in ("aarch64", "arm64") else variant
    if built_for != expected:
        raise BuildError(f"{path} was built for {built_for}, not {expected} (a stale or foreign cache file: "
                         "delete it)")
    return lib
