"""``MSGCCheckpointer``: fvcore's Checkpointer with crash-safe saves and strict, format-aware loads."""
import logging
import os

import torch
from fvcore.common.checkpoint import Checkpointer

from ..utils.file_io import PathManager

__all__ = ["MSGCCheckpointer"]

logger = logging.getLogger(__name__)


class MSGCCheckpointer(Checkpointer):
    """Saves and loads checkpoints of msgc models.

    - ``save(name, **extra)`` writes ``name.pth`` in ``save_dir`` through a temporary file and
      ``os.replace``, then updates the ``last_checkpoint`` pointer the same way: a crash at any instant
      leaves the previous checkpoint loadable. Pass ``cfg=`` to store the config as a YAML string.
    - ``load(path_or_url)`` reads local paths and URLs (iopath) and recognises the file's format
      itself (see :mod:`msgc.checkpoint.formats`). A shape mismatch is an error naming the key.
    """

    def __init__(self, model, save_dir: str = "", *, save_to_disk: bool = True, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.path_manager = PathManager

    def save(self, name: str, **kwargs) -> None:
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
        os.makedirs(self.save_dir, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.logger.info("Saved checkpoint to %s", path)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(last_filename_basename)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _load_file(self, f: str):
        from .formats import load_checkpoint_file

        return load_checkpoint_file(f, self.model)

    def _load_model(self, checkpoint):
        model_sd = self.model.state_dict()
        for key, value in checkpoint["model"].items():
            if key in model_sd and tuple(model_sd[key].shape) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint key '{key}' has shape {tuple(value.shape)} but the model expects "
                    f"{tuple(model_sd[key].shape)}: the weights are for another architecture or width")
        return super()._load_model(checkpoint)
