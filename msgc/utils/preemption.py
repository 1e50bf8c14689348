"""Stopping cleanly on a scheduler's signal: SIGTERM, or SIGUSR1 (SLURM's ``--signal`` warning).

Three pieces, used by the engine and the data loaders:

- :class:`StopRequest`, installed in a training process, records these signals and does nothing else
  (a handler that saved or exited could interrupt a save half-way). The trainer's
  :class:`~msgc.engine.hooks.PreemptionCheckpointer` reads it after each step.
- :func:`guard_worker` makes a DataLoader worker ignore them: a scheduler signals every process of a
  job, and a worker ended by the signal would make its training process fail while it saves. The
  worker still ends when its owner exits (:func:`owner_exiting` is set then) or dies. Workers are
  started with the signals blocked (:func:`stop_signals_blocked`), so that none arrives before the
  guard is in place; the guard unblocks them.
- :class:`Preempted`, raised once the checkpoint is saved, ends the process with :data:`EXIT_STATUS`.
"""
import contextlib
import functools
import multiprocessing
import multiprocessing.util
import os
import signal
import threading

__all__ = ["STOP_SIGNALS", "EXIT_STATUS", "Preempted", "StopRequest", "guard_worker", "owner_exiting",
           "stop_signals_blocked"]

#: The signals that stop a run cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

#: The exit status of a run stopped by one of them after saving its checkpoint: 143 = 128 + SIGTERM, the
#: status that shells and schedulers already read as "terminated" (also after SIGUSR1).
EXIT_STATUS = 143


class Preempted(SystemExit):
    """Ends a run stopped by a signal (exit status :data:`EXIT_STATUS`, no traceback).

    A SystemExit, so that ``except Exception`` blocks let it through, and so that the process ends
    with the status wherever it is raised: one process, a spawned rank or a torchrun worker.
    """

    def __init__(self, message: str = ""):
        super().__init__(EXIT_STATUS)
        self.message = message

    def __str__(self):
        return self.message


class StopRequest:
    """Records SIGTERM and SIGUSR1 while installed; :attr:`received` lists them in order of arrival.

    ``install()`` works in the main thread only (Python's rule for signal handlers); elsewhere it does
    nothing and returns False. ``uninstall()`` restores the previous handlers.
    """

    def __init__(self):
        self.received = []
        self._previous = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def names(self) -> str:
        """The received signals, e.g. ``"SIGUSR1, SIGTERM"``."""
        return ", ".join(signal.Signals(s).name for s in self.received)

    def _handle(self, signum, frame):
        self.received.append(signum)

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return True

    def uninstall(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


_OWNER_EXITING = None


def owner_exiting():
    """An event, shared with this process's DataLoader workers, set when this process starts exiting.

    It is set by a multiprocessing finaliser, which runs before multiprocessing terminates the
    process's daemonic children, in a main process (at interpreter exit) as in a spawned one.
    """
    global _OWNER_EXITING
    if _OWNER_EXITING is None:
        _OWNER_EXITING = multiprocessing.Event()
        multiprocessing.util.Finalize(None, _OWNER_EXITING.set, exitpriority=100)
    return _OWNER_EXITING


def _worker_signal(exiting, signum, frame):
    if exiting.is_set():  # the owner is exiting and ends its workers: go
        os._exit(0)


def guard_worker(exiting):
    """In a DataLoader worker: ignore the stop signals unless ``exiting`` (see :func:`owner_exiting`).

    A signal that arrived while the worker started, blocked until now, is ignored as well.
    """
    handler = functools.partial(_worker_signal, exiting)
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread (and so in the processes it starts) for a while.

    A stop signal sent to this process meanwhile is handled when the block ends (or by another thread),
    not lost.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
