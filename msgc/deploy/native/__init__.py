"""msgc.deploy's CPU kernels (``csrc/``), built on first use for this CPU's instruction set.

The C sources are compiled with ``$CC`` (default ``cc``) into ``$MSGC_CACHE`` (default
``~/.cache/msgc``), once per variant (``avx512``, ``avx2``, ``portable``; see :mod:`.build`), and loaded
with ctypes; they run on their own thread pool (``csrc/pool.c``), as many threads as
``torch.get_num_threads()``. The default variant is the best this
CPU runs (``MSGC_ISA`` picks another it can run). Where no compiler works, :func:`available` is False,
:func:`status` says why, and deployment uses PyTorch's kernels. ``MSGC_NATIVE=0`` turns them off.
"""
import logging
import os
import threading
from typing import Dict, Optional

from . import abi
from .build import VARIANTS, BuildError, cpu_variants
from .library import Library, NativeError, blocked

__all__ = ["Library", "NativeError", "BuildError", "VARIANTS", "available", "status", "library", "variants",
           "fma_peaks", "blocked", "abi"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: Dict[str, Library] = {}
_default: Optional[str] = None
_status = "not loaded yet"


def variants():
    """The variants this machine can build and run, best first (without building them)."""
    try:
        return [v for v in cpu_variants() if v in VARIANTS]
    except (OSError, BuildError):
        return []


def library(variant: Optional[str] = None) -> Library:
    """The loaded library of ``variant`` (default: the best this CPU runs, or ``MSGC_ISA``).

    Raises :class:`BuildError` (or :class:`abi.AbiMismatch`) if it cannot be built or loaded.
    """
    global _default
    with _lock:
        if variant is None:
            if _default is None:
                _default = _choose()
            variant = _default
        if variant not in _loaded:
            _loaded[variant] = Library(variant)
        return _loaded[variant]


def _choose() -> str:
    runnable = cpu_variants()
    wanted = os.environ.get("MSGC_ISA")
    if wanted:
        if wanted not in runnable:
            raise BuildError(f"MSGC_ISA={wanted}: this CPU runs {', '.join(runnable)}")
        return wanted
    return runnable[0]


def _load() -> Optional[Library]:
    global _status
    if os.environ.get("MSGC_NATIVE", "1") == "0":
        _status = "turned off by MSGC_NATIVE=0"
        return None
    if _status.startswith("unavailable"):  # tried once: do not run the compiler again
        return None
    try:
        lib = library()
    except (OSError, BuildError, abi.AbiMismatch) as e:
        _status = f"unavailable ({e}); using PyTorch's kernels"
        logger.warning("msgc.deploy: native kernels %s", _status)
        return None
    _status = f"loaded: {lib.variant} ({lib.vector_floats} floats per vector, {lib.registers} registers)"
    return lib


def available() -> bool:
    """Whether the default variant builds and loads (builds it on the first call)."""
    return _load() is not None


def status() -> str:
    """What was loaded, with the instruction set it was built for, or why nothing was."""
    _load()
    return _status


def fma_peaks() -> Dict[str, float]:
    """variant -> its multiply-add peak on one core in GMAC/s (:meth:`Library.fma_peak`), for every
    variant this CPU runs, best first; a variant that does not build is left out."""
    out = {}
    for v in variants():
        try:
            out[v] = library(v).fma_peak()
        except (OSError, BuildError, abi.AbiMismatch) as e:
            logger.warning("msgc.deploy: no FMA peak for the %s kernels (%s)", v, e)
    return out
