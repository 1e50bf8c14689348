"""Configs: :func:`get_cfg` returns a copy of the commented default tree in ``defaults.py``."""
from .config import CfgNode, ConfigError

__all__ = ["CfgNode", "ConfigError", "get_cfg", "load_cfg"]


def get_cfg() -> CfgNode:
    """Return a fresh copy of the default config; merge yaml files and overrides into it."""
    from .defaults import _C

    return _C.clone()


def load_cfg(config_file: str = "", opts=()) -> CfgNode:
    """The defaults, then ``config_file`` (if given), then the ``KEY VALUE`` overrides in ``opts``."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg
