"""One metrics channel: an :class:`EventStorage` that everything logs into, and writers that read it.

The trainer opens an :class:`EventStorage` for the whole run. Anything running inside it (the trainer,
hooks, the model) logs scalars with ``get_event_storage().put_scalar(name, value)`` (and, for
TensorBoard only, images and histograms with ``put_image`` and ``put_histogram``); the writers
(:class:`ConsoleWriter`, :class:`JSONWriter`, :class:`TensorboardWriter`) only read the storage, so a new
metric shows up in the console, ``metrics.json`` and TensorBoard without touching them.

Each process has its own storage and logs its own values; nothing here communicates between processes
(the writers run on the main process and so report rank 0's metrics).
"""
import datetime
import json
import logging
import os
import time
from collections import defaultdict

import torch
from fvcore.common.history_buffer import HistoryBuffer

from .file_io import PathManager

__all__ = ["EventStorage", "get_event_storage", "EventWriter", "ConsoleWriter", "JSONWriter",
           "TensorboardWriter", "read_metrics"]

_STORAGE_STACK = []


def get_event_storage() -> "EventStorage":
    """The innermost open :class:`EventStorage`; raises if none is open (i.e. outside training)."""
    if not _STORAGE_STACK:
        raise RuntimeError("get_event_storage() was called outside an EventStorage context; open one "
                           "with `with EventStorage():` (the trainer does this during train())")
    return _STORAGE_STACK[-1]


class EventStorage:
    """Scalar histories indexed by iteration, open as a context manager for the duration of training.

    ``put_scalar`` records a value at the current iteration (``storage.iter``, advanced by the trainer).
    A value marked ``smoothing_hint=True`` (the default) is noisy per iteration, and writers report its
    median over a window; ``False`` marks values such as the learning rate or an evaluation result that
    writers report as they are.

    Args:
        start_iter: the iteration the storage starts at (the resumed iteration when resuming).
    """

    def __init__(self, start_iter: int = 0):
        self.iter = start_iter
        self._history = defaultdict(HistoryBuffer)
        self._smoothing_hints = {}
        self._latest = {}
        self._counts = defaultdict(int)
        self._images, self._histograms = [], []  # for TensorBoard only: scalars are the metrics

    def put_scalar(self, name: str, value, smoothing_hint: bool = True, cur_iter: int = None):
        """Record ``value`` (a number or a 0-d tensor) under ``name`` at the current iteration."""
        if isinstance(value, torch.Tensor):
            value = value.detach().item()
        value = float(value)
        it = self.iter if cur_iter is None else cur_iter
        self._history[name].update(value, it)
        self._latest[name] = (value, it)
        self._counts[name] += 1
        previous = self._smoothing_hints.setdefault(name, smoothing_hint)
        if previous != smoothing_hint:
            raise ValueError(f"metric '{name}' was logged with smoothing_hint={previous} before and "
                             f"{smoothing_hint} now; use one value per metric")

    def put_scalars(self, *, smoothing_hint: bool = True, cur_iter: int = None, **values):
        """``put_scalar`` for each keyword argument."""
        for name, value in values.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint, cur_iter=cur_iter)

    def history(self, name: str) -> HistoryBuffer:
        """The :class:`HistoryBuffer` of one metric; raises KeyError naming the known metrics."""
        if name not in self._history:
            raise KeyError(f"no metric '{name}' was logged; logged: {', '.join(sorted(self._history))}")
        return self._history[name]

    def histories(self) -> dict:
        """All histories, name -> :class:`HistoryBuffer`."""
        return dict(self._history)

    def latest(self) -> dict:
        """name -> (latest value, iteration it was logged at)."""
        return dict(self._latest)

    def latest_with_smoothing_hint(self, window: int = 20) -> dict:
        """Like :meth:`latest`, but metrics with a smoothing hint give their median over ``window``."""
        out = {}
        for name, (value, it) in self._latest.items():
            if self._smoothing_hints[name]:
                value = self._history[name].median(window)
            out[name] = (value, it)
        return out

    def smoothing_hints(self) -> dict:
        return dict(self._smoothing_hints)

    def put_image(self, name: str, image):
        """Queue an image (``H x W x 3`` uint8 array or tensor) for TensorBoard at the current iteration."""
        self._images.append((name, image, self.iter))

    def put_histogram(self, name: str, values):
        """Queue a histogram of ``values`` (a 1-d array or tensor) for TensorBoard at the current iteration."""
        self._histograms.append((name, values, self.iter))

    def pop_images(self) -> list:
        """The queued ``(name, image, iteration)`` and an empty queue: the TensorBoard writer takes them."""
        images, self._images = self._images, []
        return images

    def pop_histograms(self) -> list:
        """The queued ``(name, values, iteration)`` and an empty queue."""
        histograms, self._histograms = self._histograms, []
        return histograms

    def put_counts(self) -> dict:
        """name -> how many values were logged so far: writers use it to find what is new."""
        return dict(self._counts)

    def step(self):
        """Advance to the next iteration."""
        self.iter += 1

    def __enter__(self):
        _STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc):
        assert _STORAGE_STACK[-1] is self, "EventStorage contexts must be closed in order"
        _STORAGE_STACK.pop()


class EventWriter:
    """Reads the current :class:`EventStorage` and writes what it finds somewhere."""

    def write(self):
        raise NotImplementedError  # abstract: every writer implements it

    def close(self):
        pass


def _new_values(storage, seen: dict, window: int):
    """(name, (value, iteration)) of the metrics logged since the last call with the same ``seen``."""
    counts = storage.put_counts()
    new = [(n, v) for n, v in storage.latest_with_smoothing_hint(window).items() if counts[n] > seen.get(n, 0)]
    seen.update(counts)
    return new


class JSONWriter(EventWriter):
    """Appends one JSON object per write to a file (JSON lines): ``{"iteration": i, name: value, ...}``.

    Each line holds the metrics logged since the previous write, grouped by the iteration they were
    logged at; values with a smoothing hint are the median over ``window``.
    """

    def __init__(self, path: str, window: int = 20):
        self._file = PathManager.open(path, "a")
        self._window = window
        self._seen = {}

    def write(self):
        by_iter = defaultdict(dict)
        for name, (value, it) in _new_values(get_event_storage(), self._seen, self._window):
            by_iter[it][name] = value
        for it in sorted(by_iter):
            self._file.write(json.dumps({"iteration": it, **by_iter[it]}, sort_keys=True) + "\n")
        if by_iter:
            self._file.flush()

    def close(self):
        self._file.close()


def read_metrics(path: str) -> list:
    """The records of a ``metrics.json`` written by :class:`JSONWriter`, as the run finally saw them.

    A resumed run appends the iterations after its checkpoint again; their new records replace the
    old ones. An unterminated last line (a run writing, or killed while writing) is left out with a
    warning; any other line that is not a JSON object is an error naming the file and line.
    """
    with PathManager.open(path, "r") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "iteration" not in record:
                raise ValueError("not an object with an 'iteration'")
        except ValueError as e:
            if number == len(lines):  # the last line has no newline: still being written
                logging.getLogger(__name__).warning("%s:%d: incomplete last line left out", path, number)
                break
            raise ValueError(f"{path}:{number}: not a metrics record ({e})") from None
        while records and records[-1]["iteration"] > record["iteration"]:
            records.pop()  # written before a resume, and written again after it
        records.append(record)
    return records


class TensorboardWriter(EventWriter):
    """Writes every new scalar value, and the images and histograms queued in the storage
    (:meth:`EventStorage.put_image`, :meth:`EventStorage.put_histogram`), to TensorBoard event files in
    ``log_dir``."""

    def __init__(self, log_dir: str, window: int = 20):
        from torch.utils.tensorboard import SummaryWriter  # heavy import: only when used

        self._writer = SummaryWriter(log_dir)
        self._window = window
        self._seen = {}

    def write(self):
        storage = get_event_storage()
        for name, (value, it) in _new_values(storage, self._seen, self._window):
            self._writer.add_scalar(name, value, it)
        for name, image, it in storage.pop_images():
            self._writer.add_image(name, image, it, dataformats="HWC")
        for name, values, it in storage.pop_histograms():
            self._writer.add_histogram(name, values, it)
        self._writer.flush()

    def close(self):
        self._writer.close()


class ConsoleWriter(EventWriter):
    """Prints one line per write: ETA, iteration, each loss, the MAC ratio against its target, the
    learning rate of each parameter group, step time, images/s and (on CUDA) peak memory.

    Reads the metrics the trainer and hooks log: ``loss_*``, ``total_loss``, ``mac_ratio``,
    ``mac_target``, ``gate_open``, ``lr/<group>``, ``time`` and ``data_time``; any other metric logged
    with a smoothing hint is appended at the end.

    Args:
        max_iter: total iterations, for the ETA.
        ims_per_batch: global batch size, for images/s.
        window: median window of smoothed metrics.
    """

    _SHOWN = ("time", "data_time", "mac_ratio", "mac_target", "total_loss")

    def __init__(self, max_iter: int, ims_per_batch: int = 0, window: int = 20):
        self.logger = logging.getLogger("msgc.train")
        self._max_iter = max_iter
        self._ims_per_batch = ims_per_batch
        self._window = window
        self._last = None  # (iteration, wall time) of the previous write, for the ETA fallback

    def write(self):
        storage = get_event_storage()
        it = storage.iter
        if self._last is not None and self._last[0] == it:  # already printed (e.g. after_train)
            return
        parts = [f"eta: {self._eta(storage)}", f"iter: {it + 1}/{self._max_iter}"]
        parts += self._losses(storage)
        parts += self._macs(storage)
        parts += self._others(storage)
        parts += self._lrs(storage)
        parts += self._speed(storage)
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
            parts.append(f"max_mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}M")
        self.logger.info("  ".join(parts))

    def _median(self, storage, name):
        hist = storage.histories().get(name)
        return None if hist is None else hist.median(self._window)

    def _eta(self, storage):
        step = self._median(storage, "time")
        now = time.perf_counter()
        if step is None and self._last is not None and storage.iter > self._last[0]:
            step = (now - self._last[1]) / (storage.iter - self._last[0])
        self._last = (storage.iter, now)
        if step is None:
            return "N/A"
        seconds = step * (self._max_iter - storage.iter - 1)
        return str(datetime.timedelta(seconds=int(seconds)))

    def _losses(self, storage):
        names = sorted(n for n in storage.histories() if n.startswith("loss_")) + ["total_loss"]
        return [f"{n}: {self._median(storage, n):.4g}" for n in names if n in storage.histories()]

    def _macs(self, storage):
        ratio, target = self._median(storage, "mac_ratio"), storage.latest().get("mac_target")
        if ratio is None:
            return []
        text = f"mac_ratio: {ratio:.4f}"
        return [text + (f" (target {target[0]:.4f})" if target is not None else "")]

    def _others(self, storage):
        hints = storage.smoothing_hints()
        names = [n for n in sorted(storage.histories())
                 if hints[n] and not n.startswith("loss_") and "/" not in n and n not in self._SHOWN]
        return [f"{n}: {self._median(storage, n):.4g}" for n in names]

    def _lrs(self, storage):
        lrs = {n[3:]: v for n, (v, _) in storage.latest().items() if n.startswith("lr/")}
        return [f"lr {name}: {lr:.4g}" for name, lr in lrs.items()]

    def _speed(self, storage):
        step, data = self._median(storage, "time"), self._median(storage, "data_time")
        out = []
        if step is not None:
            out.append(f"time: {step:.4f}")
            if self._ims_per_batch and step > 0:
                out.append(f"img/s: {self._ims_per_batch / step:.1f}")
        if data is not None:
            out.append(f"data_time: {data:.4f}")
        return out


def default_writers(output_dir: str, max_iter: int, ims_per_batch: int = 0, window: int = 20):
    """Console, ``<output_dir>/metrics.json`` and TensorBoard writers (the last two if output_dir)."""
    writers = [ConsoleWriter(max_iter, ims_per_batch, window)]
    if output_dir:
        PathManager.mkdirs(output_dir)
        writers.append(JSONWriter(os.path.join(output_dir, "metrics.json"), window))
        writers.append(TensorboardWriter(output_dir, window))
    return writers
