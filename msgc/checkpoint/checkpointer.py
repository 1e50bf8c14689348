"""``MSGCCheckpointer``: fvcore's Checkpointer with crash-safe saves and strict, format-aware loads."""
import logging
import os
import re

import torch
from fvcore.common.checkpoint import Checkpointer

from ..modeling.budget import BudgetTable, set_budget_table
from ..utils.errors import FileWriteError
from ..utils.file_io import PathManager, get_local_path, is_url, write_atomic
from .formats import (LOAD_INFO_KEY, CheckpointError, LoadInfo, check_fit, incompatible_keys_table,
                      load_checkpoint_file)

__all__ = ["MSGCCheckpointer"]

logger = logging.getLogger(__name__)


class MSGCCheckpointer(Checkpointer):
    """Saves and loads checkpoints of msgc models.

    - ``save(name, **extra)`` writes ``name.pth`` in ``save_dir`` through a temporary file and
      ``os.replace``, then updates the ``last_checkpoint`` pointer the same way: a crash at any instant
      leaves the previous checkpoint loadable. A write that fails (disk full, ...) leaves the previous
      checkpoint and ``last_checkpoint`` as they were and raises
      :class:`~msgc.utils.errors.FileWriteError` naming the file and the errno. Pass ``cfg=`` to store
      the config as a YAML string.
    - ``remove_old(prefix, keep)`` deletes periodic checkpoints beyond the newest ``keep``.
    - ``load(path_or_url)`` reads local paths and URLs (iopath; a URL that cannot be fetched is an
      error naming the local file that would replace it) and recognises the file's format itself (see
      :mod:`msgc.checkpoint.formats`): this project's checkpoints, torchvision state dicts and
      original MSGC release checkpoints.
    - A checkpoint's ``budget_table`` extra (``save(..., budget_table=table.as_dict())``, written by
      ``tools/calibrate_gates.py --budgets``) is attached to the model when it loads
      (:func:`msgc.modeling.budget_table`); a checkpoint without one detaches any table the model had.

    Loads are checked before anything is copied, so a failed load leaves the model as it was. Host
    tensors (everything but the ``maskgen*``/``attgen*`` generators) must match one to one: a host
    tensor the file lacks, one the model lacks, or a shape mismatch is an error naming the file and
    the key, because it means weights of another architecture (fvcore would skip such tensors with a
    warning). Generator tensors may be absent from the file (torchvision weights have none; the
    generators keep their initialisation) or unused (a gated checkpoint in a dense model); a table of
    them is logged. For torchvision and release files the host keys checked are those of the model's
    :class:`~msgc.modeling.Backbone` (the model may hold more, e.g. a detector's heads).
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk: bool = True, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = PathManager

    #: the iteration of the last checkpoint this checkpointer saved (None: none yet)
    last_saved_iteration = None

    def save(self, name: str, tag_last: bool = True, **kwargs) -> None:
        """Write ``name.pth``; ``tag_last=False`` leaves ``last_checkpoint`` as it is (a file that a
        resume must not continue from, such as a calibrated copy of the final model)."""
        if not self.save_dir or not self.save_to_disk:
            return
        cfg = kwargs.pop("cfg", None)
        data = {"model": self.model.state_dict(), "__msgc__": 1}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if cfg is not None:
            data["config"] = cfg.dump()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        try:
            write_atomic(path, lambda f: torch.save(data, f))
        except FileWriteError as e:
            raise FileWriteError(f"{e}; {self._intact()}") from e
        self.logger.info("Saved checkpoint to %s", path)
        if tag_last:
            self.tag_last_checkpoint(basename)
            self.last_saved_iteration = kwargs.get("iteration")

    def _intact(self) -> str:
        previous = self.get_checkpoint_file() if self.has_checkpoint() else ""
        if not previous:
            return "no earlier checkpoint in this folder"
        return f"the previous checkpoint {previous}, named in last_checkpoint, is intact"

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        try:
            write_atomic(path, lambda f: f.write(last_filename_basename), mode="w")
        except FileWriteError as e:
            raise FileWriteError(f"{e}; {self._intact()}") from e

    def remove_old(self, prefix: str, keep: int) -> list:
        """Delete ``<prefix>_<7 digits>.pth`` files of ``save_dir`` beyond the newest ``keep``.

        Never deletes the file named in ``last_checkpoint`` (nor ``model_best.pth`` and
        ``model_final.pth``, whose names do not match); ``keep`` <= 0 keeps everything. Call it after
        a save, which has written the new checkpoint and ``last_checkpoint``. A file that cannot be
        deleted is a warning. Returns the deleted paths.
        """
        if keep <= 0 or not self.save_dir or not self.save_to_disk:
            return []
        pattern = re.compile(rf"^{re.escape(prefix)}_(\d{{7}})\.pth$")
        found = sorted((int(m.group(1)), m.group(0)) for m in map(pattern.match, os.listdir(self.save_dir)) if m)
        protected = {os.path.basename(self.get_checkpoint_file())} if self.has_checkpoint() else set()
        removed = []
        for _, basename in found[:-keep]:
            if basename in protected:
                continue
            path = os.path.join(self.save_dir, basename)
            try:
                os.remove(path)
                removed.append(path)
            except OSError as e:
                logger.warning("Could not delete the old checkpoint %s: %s", path, e)
        if removed:
            logger.info("Deleted %d old checkpoint(s), keeping the newest %d: %s", len(removed), keep,
                        ", ".join(os.path.basename(p) for p in removed))
        return removed

    def load(self, path: str, checkpointables=None):
        """Load weights of any format msgc knows (see :mod:`msgc.checkpoint.formats`).

        Returns the checkpoint's extras (those of :meth:`save`; nothing for foreign formats). Raises
        :class:`~msgc.checkpoint.formats.CheckpointError` (a ValueError) naming the file when it is
        unreadable, of an unknown format, or does not fit the model (a missing or unexpected host
        tensor, or a shape mismatch); nothing is loaded then.
        """
        if path and not is_url(path) and not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        self._source = path
        extras = super().load(get_local_path(path) if path else path, checkpointables=checkpointables)
        if path:
            table = extras.get("budget_table")
            set_budget_table(self.model, None if table is None else BudgetTable.from_dict(table))
        return extras

    def _load_file(self, f: str):
        return load_checkpoint_file(f, self.model, display_path=getattr(self, "_source", None))

    def _load_model(self, checkpoint):
        info = checkpoint.pop(LOAD_INFO_KEY, None) or LoadInfo("<checkpoint>", "msgc", "")
        missing, unexpected = check_fit(self.model.state_dict(), checkpoint["model"], info)
        self._last_load = (info, missing, unexpected, len(checkpoint["model"]) - len(unexpected))
        return super()._load_model(checkpoint)

    def _log_incompatible_keys(self, incompatible) -> None:
        """One table of missing and unexpected keys (fit was checked before loading)."""
        info, missing, unexpected, loaded = self._last_load
        if not missing and not unexpected:
            logger.info("Loaded %s (%s): %d tensors, all matched", info.path, info.format, loaded)
            return
        expected = info.format == "torchvision" and not unexpected
        level = logging.INFO if expected else logging.WARNING
        logger.log(
            level, "Loaded %s (%s): %d tensors; %d generator tensors missing from the file keep their "
            "initialisation, %d tensors of the file are not used:\n%s", info.path, info.format, loaded,
            len(missing), len(unexpected), incompatible_keys_table(missing, unexpected))
