"""Checkpoints: crash-safe saves and loading of this project's, torchvision's and the original MSGC release's weights."""
from .checkpointer import MSGCCheckpointer

__all__ = ["MSGCCheckpointer"]
