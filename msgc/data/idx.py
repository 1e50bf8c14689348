"""A reader of the IDX format (MNIST, Fashion-MNIST), plain or gzip-compressed.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in row-major order, big-endian. The MNIST family
stores unsigned bytes (type code 0x08): images ``N x 28 x 28`` and labels ``N``.
"""
import gzip
import os

import numpy as np

from ..utils.errors import InvalidValueError

__all__ = ["read_idx", "IDX_TYPES"]

#: IDX type codes and the numpy types of their values (big-endian where it matters)
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
             0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":  # the gzip magic
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off stream an EOFError
        raise InvalidValueError(f"IDX file '{path}' cannot be read: {e}") from e


def read_idx(path: str, shape=None) -> np.ndarray:
    """The array stored in the IDX file ``path`` (``.gz`` or not, recognised from its first bytes).

    Args:
        shape: the expected shape; ``None`` entries match any size (e.g. ``(None, 28, 28)``).

    Raises:
        InvalidValueError naming the file: not an IDX file, truncated, with bytes past its end, or of
        another shape than ``shape``.
    """
    data = _read_bytes(path)
    name = os.path.basename(path)
    if len(data) < 4 or data[0] or data[1] or data[2] not in IDX_TYPES:
        raise InvalidValueError(f"'{path}' is not an IDX file (its magic number is {data[:4].hex() or 'missing'})")
    dtype, ndim = IDX_TYPES[data[2]], data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise InvalidValueError(f"IDX file '{path}' is truncated: its header of {ndim} dimensions is cut off")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = start + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise InvalidValueError(f"IDX file '{path}' is {what}: {len(data)} bytes for a {'x'.join(map(str, dims))} "
                                f"array of {dtype.itemsize}-byte values ({expected} bytes with the header)")
    if shape is not None and (len(shape) != len(dims) or any(s not in (None, d) for s, d in zip(shape, dims))):
        want = "x".join("N" if s is None else str(s) for s in shape)
        raise InvalidValueError(f"IDX file '{path}' holds a {'x'.join(map(str, dims))} array; {name} should be {want}")
    return np.frombuffer(data, dtype, offset=start).reshape(dims).astype(dtype.newbyteorder("="), copy=False)
