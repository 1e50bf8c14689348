"""Configs: :func:`get_cfg` returns a copy of the commented default tree in ``defaults.py``."""
from .config import CfgNode, ConfigError

__all__ = ["CfgNode", "ConfigError", "get_cfg"]


def get_cfg() -> CfgNode:
    """Return a fresh copy of the default config; merge yaml files and overrides into it."""
    from .defaults import _C

    return _C.clone()
