"""Logging set-up: the main process logs to the console and ``log.txt``; other ranks to their own file."""
import logging
import os
import sys

from .file_io import PathManager

__all__ = ["setup_logger", "log_files", "FILE_ONLY"]

#: ``logger.info(..., extra=FILE_ONLY)``: a record for the log files only, kept off the console (e.g. the
#: model's printout, hundreds of lines that would bury the one-line errors and the final table)
FILE_ONLY = {"msgc_file_only": True}

_FORMAT = "[%(asctime)s %(name)s %(levelname)s]: %(message)s"
_DATE = "%m/%d %H:%M:%S"
_HANDLERS = {}  # ("stdout",) or ("file", path) -> the one handler shared by the configured loggers


def setup_logger(output: str = None, distributed_rank: int = 0, name: str = "msgc",
                 level: int = logging.INFO) -> logging.Logger:
    """Configure the ``name`` logger (and fvcore's, whose checkpointer logs through it).

    Rank 0 prints to stdout; every rank writes to a file when ``output`` is given: ``output`` itself if
    it ends in ``.txt``/``.log``, else ``output/log.txt`` (``log.txt.rank<r>`` for rank r > 0). Calling
    it again adds no duplicate handler; a new ``output`` replaces the previous log file.

    Returns:
        the configured logger.
    """
    keys = [("stdout",)] if distributed_rank == 0 else []
    if output:
        keys.append(("file", os.path.abspath(_log_file(output, distributed_rank))))
    for logger_name in (name, "fvcore"):
        logger = logging.getLogger(logger_name)
        logger.setLevel(level)
        logger.propagate = False
        for handler in [h for h in logger.handlers if getattr(h, "_msgc_key", None) not in (None, *keys)]:
            logger.removeHandler(handler)
        for key in keys:
            if _handler(key) not in logger.handlers:
                logger.addHandler(_handler(key))
    return logging.getLogger(name)


def log_files(name: str = "msgc") -> list:
    """The files the ``name`` logger writes to (none before :func:`setup_logger` is given an output)."""
    return [h._msgc_key[1] for h in logging.getLogger(name).handlers if getattr(h, "_msgc_key", ("",))[0] == "file"]


def _log_file(output: str, rank: int) -> str:
    path = output if output.endswith((".txt", ".log")) else os.path.join(output, "log.txt")
    return path if rank == 0 else f"{path}.rank{rank}"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at each record (it may be replaced, e.g. by pytest), except
    the records logged with ``extra=FILE_ONLY``."""

    def filter(self, record):
        return not getattr(record, "msgc_file_only", False) and super().filter(record)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _handler(key: tuple) -> logging.Handler:
    if key not in _HANDLERS:
        if key[0] == "stdout":
            handler = _StdoutHandler()
        else:
            PathManager.mkdirs(os.path.dirname(key[1]))
            handler = logging.StreamHandler(PathManager.open(key[1], "a"))
        handler._msgc_key = key
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATE))
        _HANDLERS[key] = handler
    return _HANDLERS[key]
