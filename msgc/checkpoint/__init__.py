"""Checkpoints: crash-safe saves, and loading of this project's, torchvision's and the original MSGC release's
weights."""
from .checkpointer import MSGCCheckpointer
from .formats import CheckpointError, load_checkpoint_file

__all__ = ["CheckpointError", "MSGCCheckpointer", "load_checkpoint_file"]
