"""Errors raised on purpose for bad input, and how the command lines show them: one line, exit status 2.

msgc raises a :class:`UserError` where it finds something that the user, not the code, must fix: a
config key or value, a path, the contents of a file, a device the machine lacks, a full disk. Entry
points (``tools/*.py``, the projects' ``train_net.py``) run inside :func:`exit_on_user_error`, which
prints ``error: <message> (<where>; ...)`` on stderr and exits with status 2. Every other exception is
a bug and keeps its traceback; ``MSGC_DEBUG=1`` shows the traceback of a UserError too.

Each subclass also derives from the built-in type that fits (ValueError, KeyError, OSError, ...), so
that code catching those still works, and must be constructible from its message alone: a DataLoader
re-creates an exception raised in a worker process as ``type(message)``.

The classes::

    UserError                          bad input, shown as one line
    +-- InvalidValueError  ValueError  a value that cannot work (config, command line, file contents)
    +-- MissingFileError   FileNotFoundError  a file or folder that does not exist
    +-- FileWriteError     OSError     a file that cannot be written (disk full, permission denied)
    (and, next to the code that raises them: ConfigError, UnknownNameError, CheckpointError,
    CorruptImageError, DownloadError, LaunchError, NonFiniteLossError)
"""
import argparse
import contextlib
import os
import re
import sys

__all__ = ["UserError", "InvalidValueError", "MissingFileError", "FileWriteError", "ArgumentParser",
           "exit_on_user_error", "error_line", "one_line", "EXIT_STATUS"]

#: The exit status of a command line stopped by bad input (argparse's status for bad arguments).
EXIT_STATUS = 2

_DEBUG_HINT = "MSGC_DEBUG=1 shows the traceback"
# How torch.utils.data re-raises in the main process an exception of a DataLoader worker.
_WORKER_REPLAY = re.compile(r"^Caught \w+ in DataLoader worker process (\d+)\.\s*\nOriginal Traceback", re.M)


class UserError(Exception):
    """Bad input that the user can fix; command lines show its message alone, in one line."""


class InvalidValueError(UserError, ValueError):
    """A value that cannot work: of a config key, a command-line argument or a file's contents."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that the run needs does not exist."""


class FileWriteError(UserError, OSError):
    """A file could not be written (disk full, permission denied, ...); the message names it and the errno."""


def debug_enabled() -> bool:
    """``MSGC_DEBUG`` is set: user errors keep their traceback."""
    return bool(os.environ.get("MSGC_DEBUG"))


def _message_and_worker(error: BaseException):
    """The error's own message, and the DataLoader worker that raised it (None: this process)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    replay = _WORKER_REPLAY.search(text)
    if replay is None:
        return text, None
    last = text.rstrip().splitlines()[-1]  # "package.module.ClassName: the message"
    name = type(error).__name__
    if f"{name}: " in last:
        last = last.split(f"{name}: ", 1)[1]
    return last, int(replay.group(1))


def one_line(error: BaseException) -> str:
    """The error's message in one line (a DataLoader worker's error unwrapped, naming the worker)."""
    message, worker = _message_and_worker(error)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return message if worker is None else f"{message} (DataLoader worker {worker})"


def error_line(error: BaseException, where=()) -> str:
    """The one line that shows ``error``: ``error: <message> (<where>, ...; MSGC_DEBUG=1 ...)``.

    ``where`` names the process (e.g. ``"rank 1 of 2"``); a DataLoader worker's error is unwrapped
    from the traceback text that torch puts around it and names the worker.
    """
    message, worker = _message_and_worker(error)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    places = list(where) + ([f"DataLoader worker {worker}"] if worker is not None else [])
    context = (", ".join(places) + "; " if places else "") + _DEBUG_HINT
    return f"error: {message} ({context})"


def _where() -> list:
    """This process's rank when several run (from torchrun's environment before the group forms)."""
    from . import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    if world == 1 and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return [f"rank {rank} of {world}"] if world > 1 else []


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a :class:`UserError` into its one line on stderr and exit status 2 (``MSGC_DEBUG=1``: raise).

    In a process of a multi-process run the line names the rank.
    """
    try:
        yield
    except UserError as e:
        if debug_enabled():
            raise
        line = getattr(e, "line", None) or error_line(e, _where())
        print(line, file=sys.stderr, flush=True)
        sys.exit(EXIT_STATUS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (``error: ... (see --help)``, status 2), like msgc's."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_STATUS)
