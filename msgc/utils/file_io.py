"""One iopath PathManager for the project: local paths and http(s) URLs alike."""
from iopath.common.file_io import HTTPURLHandler, PathManager as _PathManagerClass

__all__ = ["PathManager"]

PathManager = _PathManagerClass()
PathManager.register_handler(HTTPURLHandler())
