"""A thin layer over fvcore's CfgNode: strict keys with suggestions, safe yaml, ``_BASE_`` files."""
import difflib
import os

import yaml
from fvcore.common.config import CfgNode as _FvcoreCfgNode

from ..utils.errors import MissingFileError, UserError

__all__ = ["CfgNode", "ConfigError"]


class ConfigError(UserError, KeyError):
    """A config file or override names a key that does not exist, or gives a value of a wrong type."""

    def __str__(self):  # KeyError would print its message in quotes
        return str(self.args[0])


def _flat_keys(node, prefix=""):
    keys = []
    for k, v in node.items():
        full = prefix + k
        keys.append(full)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, full + "."))
    return keys


def _type_hint(cfg, key):
    """``"SOLVER.MAX_ITER takes an int (now 600)"``, or None when the key's value has no simple type."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    names = {bool: "True or False", int: "an int", float: "a number", str: "a string", list: "a list",
             tuple: "a list"}
    name = names.get(type(node))
    return f"{key} takes {name} (now {node!r})" if name else None


def _unknown_key_message(key, valid, where):
    groups = {k.rsplit(".", 1)[0] for k in valid if "." in k}
    valid = [k for k in valid if k not in groups]  # suggest keys that hold values, not their groups
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    if not close:  # also try the last component, e.g. MODEL.HEADS -> MODEL.MSGC.HEADS
        last = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == last][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key '{key}' in {where}{hint}"


class CfgNode(_FvcoreCfgNode):
    """fvcore's CfgNode whose merges refuse unknown keys with a message that suggests the valid ones.

    yaml files are loaded with ``yaml.safe_load``; ``_BASE_: other.yaml`` is resolved relative to the
    file that names it, and the file's keys override its base's.
    """

    @classmethod
    def _open_cfg(cls, filename):
        if not os.path.isfile(filename):
            raise MissingFileError(f"config file {filename} does not exist")
        return super()._open_cfg(filename)

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        try:
            return super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        except yaml.YAMLError as e:
            problem = " ".join(str(e).split())
            raise ConfigError(f"config file {filename} is not valid YAML: {problem}") from None

    def merge_from_file(self, cfg_filename, allow_unsafe=False):
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        self._check_keys(loaded, f"config file {cfg_filename}")
        try:
            self.merge_from_other_cfg(type(self)(loaded))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{cfg_filename}: {e}") from None

    def merge_from_list(self, cfg_list):
        if len(cfg_list) % 2:
            raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd list: {cfg_list}")
        valid = _flat_keys(self)
        for key in cfg_list[0::2]:
            if key not in valid:
                raise ConfigError(_unknown_key_message(key, valid, "the command-line overrides"))
        for key, value in zip(cfg_list[0::2], cfg_list[1::2]):
            try:
                super().merge_from_list([key, value])
            except (KeyError, ValueError, AssertionError) as e:
                raise ConfigError(f"command-line override {key} {value}: {_type_hint(self, key) or e}") from None
        return self

    def _check_keys(self, loaded, where):
        valid = _flat_keys(self)
        for key in _flat_keys(loaded):
            if key not in valid and not any(key.startswith(v + ".") for v in valid if self._is_free(v)):
                raise ConfigError(_unknown_key_message(key, valid, where))

    def _is_free(self, full_key):
        """A key whose value is a plain dict (not a CfgNode) accepts any sub-keys."""
        node = self
        for part in full_key.split("."):
            node = node[part]
        return isinstance(node, dict) and not isinstance(node, _FvcoreCfgNode)
