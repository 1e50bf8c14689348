"""Recognise a checkpoint file's format and convert it to this project's ``{"model": state_dict}``."""
import torch

from ..utils.file_io import PathManager

__all__ = ["load_checkpoint_file"]


def load_checkpoint_file(path: str, model=None) -> dict:
    """Read ``path`` (local path or URL) and return a dict whose ``model`` is a state dict for msgc."""
    with PathManager.open(path, "rb") as f:
        data = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and "__msgc__" in data:
        return data
    raise ValueError(f"{path}: not a checkpoint of a format msgc knows")
