"""PyTorch's idle OpenMP workers, released before the native program runs.

After a parallel PyTorch op (normalising the next image, a detector's head), the OpenMP runtime that
PyTorch runs on (GNU libgomp in the x86 wheels) keeps its worker threads spinning for a few
milliseconds in wait of the next parallel region, on the cores the native program is about to use:
measured in a serving loop, that made the deployed call 43% slower on a 2-core machine (and ONNX
Runtime's call too). The native program has its own thread pool, so before a call on more than one
thread it asks the runtime to end the calling thread's idle team with ``omp_pause_resource_all``
(OpenMP 5.0, soft pause); PyTorch's next parallel op starts its workers again (tens of microseconds).
Only the calling thread's team is touched, and a call inside a parallel region is refused by the
runtime and changes nothing. ``MSGC_RELEASE_OPENMP=0`` turns it off.
"""
import ctypes
import os
import threading
from typing import Optional

__all__ = ["openmp_runtime", "release_openmp_workers"]

_OMP_PAUSE_SOFT = 1
_NAMES = ("libgomp", "libiomp5", "libomp")
_lock = threading.Lock()
_pause = None  # the runtime's omp_pause_resource_all, False where there is none
_path: Optional[str] = None


def _find() -> Optional[str]:
    """The path of the OpenMP runtime loaded in this process (PyTorch's), from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:  # not Linux
        return None
    for name in _NAMES:
        for p in sorted(paths):
            if os.path.basename(p).startswith(name + ".") or os.path.basename(p).startswith(name + "-"):
                return p
    return None


def openmp_runtime() -> Optional[str]:
    """The OpenMP runtime whose idle workers are released (its path), or None (none loaded, no
    ``omp_pause_resource_all`` in it, or ``MSGC_RELEASE_OPENMP=0``)."""
    global _pause, _path
    with _lock:
        if _pause is None:
            _pause, _path = False, None
            path = _find() if os.environ.get("MSGC_RELEASE_OPENMP", "1") != "0" else None
            if path:
                try:
                    fn = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: no second runtime
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _pause, _path = fn, path
                except (OSError, AttributeError):
                    pass
        return _path


def release_openmp_workers() -> bool:
    """End the calling thread's idle OpenMP team (soft pause); whether the runtime did."""
    if _pause is None:
        openmp_runtime()
    return bool(_pause) and _pause(_OMP_PAUSE_SOFT) == 0
