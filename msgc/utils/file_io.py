"""One iopath PathManager for the project: local paths and http(s) URLs alike; crash-safe JSON files."""
import json
import os

from iopath.common.file_io import HTTPURLHandler, PathManager as _PathManagerClass

__all__ = ["PathManager", "write_json"]

PathManager = _PathManagerClass()
PathManager.register_handler(HTTPURLHandler())


def write_json(path: str, data, **dump_kwargs):
    """Write ``data`` as JSON to a local ``path`` through a temporary file and a rename, creating the
    folder: a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, **dump_kwargs)
    os.replace(tmp, path)
