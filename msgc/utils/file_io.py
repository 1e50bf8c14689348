"""Files: one iopath PathManager for the project (local paths and http(s) URLs alike), atomic writes, and
URLs fetched into iopath's cache with an error that says where to put the file to work offline."""
import contextlib
import errno
import json
import logging
import os
import sys
from urllib.parse import urlparse

from iopath.common.download import download
from iopath.common.file_io import HTTPURLHandler, PathManager as _PathManagerClass, file_lock, get_cache_dir

from .errors import FileWriteError, UserError

__all__ = ["PathManager", "DownloadError", "write_atomic", "write_json", "describe_os_error", "is_url",
           "cached_path", "get_local_path"]

PathManager = _PathManagerClass()
PathManager.register_handler(HTTPURLHandler())


class DownloadError(UserError, OSError):
    """A URL could not be fetched; the message names it and the local file that would replace it."""


def is_url(path: str) -> bool:
    return "://" in str(path)


def cached_path(url: str) -> str:
    """The file where iopath keeps its copy of ``url``: ``<cache>/<the URL's path>``.

    ``<cache>`` is ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``; the host name is not part of the
    path (``https://download.pytorch.org/models/resnet50-0676ba61.pth`` ->
    ``~/.torch/iopath_cache/models/resnet50-0676ba61.pth``). A file put there by hand is used as the
    download, so a machine without internet access can read configs whose weights are URLs.
    """
    folder = os.path.dirname(urlparse(url).path.lstrip("/"))
    return os.path.join(get_cache_dir(), folder, url.split("/")[-1])


def get_local_path(path: str) -> str:
    """A local file for ``path``: itself, or for a URL its copy in iopath's cache (downloaded once).

    Raises :class:`DownloadError` naming the URL, the reason and :func:`cached_path` when the URL
    cannot be fetched.
    """
    if not is_url(path):
        return path
    cached = cached_path(path)
    try:
        if not os.path.isfile(cached) and len(os.path.basename(cached)) <= HTTPURLHandler.MAX_FILENAME_LEN:
            # iopath's own download, with a progress bar only for a person watching and no log of its own
            # on failure (the error says it all)
            with file_lock(cached), _quiet("iopath.common.download"):
                if not os.path.isfile(cached):
                    download(path, os.path.dirname(cached), filename=os.path.basename(cached),
                             progress=sys.stderr.isatty())
        return PathManager.get_local_path(path)  # finds the file in its cache
    except (OSError, ValueError) as e:  # urllib's URLError and HTTPError are OSErrors
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"cannot download {path} ({reason}); to work offline, put the file at "
                            f"{cached}, or give a local path instead of the URL") from e


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _os_error(error: BaseException):
    """The OSError behind ``error`` (itself, or one it was raised from: torch.save wraps them)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def describe_os_error(error: OSError) -> str:
    """``No space left on device (errno 28, ENOSPC)``."""
    name = errno.errorcode.get(error.errno, "")
    detail = error.strerror or str(error)
    return f"{detail} (errno {error.errno}{', ' + name if name else ''})" if error.errno else detail


def write_atomic(path: str, write, mode: str = "wb") -> None:
    """Write ``path`` by ``write(file)`` into a temporary file beside it, flushed to disk, then renamed
    over ``path``: at every instant ``path`` is the old file or the new one, never a part of one.

    A failure while writing (disk full, permission denied, quota, ...) removes the temporary file,
    leaves ``path`` as it was, and raises :class:`~msgc.utils.errors.FileWriteError` naming the file
    and the errno. Other errors (and KeyboardInterrupt) remove the temporary file and propagate.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = _os_error(e)
        if cause is None:
            raise
        raise FileWriteError(f"cannot write {path}: {describe_os_error(cause)}") from e
    _sync_folder(folder)


def write_json(path: str, data, **dump_kwargs) -> None:
    """Write ``data`` as JSON to a local ``path`` atomically (see :func:`write_atomic`), creating the folder."""
    write_atomic(path, lambda f: json.dump(data, f, **dump_kwargs), mode="w")


def _sync_folder(folder: str):
    """Flush the folder's entry for a renamed file to disk (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
