"""A thin layer over fvcore's CfgNode: strict keys with suggestions, safe yaml, ``_BASE_`` files."""
import difflib
import os

import yaml
from fvcore.common.config import CfgNode as _FvcoreCfgNode

from ..utils.errors import MissingFileError, UserError

__all__ = ["CfgNode", "ConfigError", "IMPORTS_KEY"]

#: The top-level key that lists the user modules to import (see :mod:`msgc.utils.imports`).
IMPORTS_KEY = "IMPORTS"


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


class _FileImports(list):
    """The ``IMPORTS`` list of a yaml file, with that file, while a ``_BASE_`` chain is merged."""

    def __init__(self, names, source: str):
        super().__init__(names)
        self.source = source


def _name_list(value):
    """An ``IMPORTS`` override: a list literal as given, or comma-separated names made into one."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return repr([n.strip() for n in value.split(",") if n.strip()])
    return value


class CfgNode(_FvcoreCfgNode):
    """fvcore's CfgNode whose merges refuse unknown keys with a message that suggests the valid ones.

    yaml files are loaded with ``yaml.safe_load``; ``_BASE_: other.yaml`` is resolved relative to the
    file that names it, and the file's keys override its base's. The merges remember where the
    top-level ``IMPORTS`` came from (:meth:`imports_origin`), for the errors of its modules.
    """

    @classmethod
    def _open_cfg(cls, filename):
        if not os.path.isfile(filename):
            raise MissingFileError(f"config file {filename} does not exist")
        return super()._open_cfg(filename)

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        try:
            loaded = super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe)
        except yaml.YAMLError as e:
            problem = " ".join(str(e).split())
            raise ConfigError(f"config file {filename} is not valid YAML: {problem}") from None
        # fvcore loads the bases first (through this method) and lets the file's own keys replace
        # theirs: a list still marked came from a base, an unmarked one from this file
        names = loaded.get(IMPORTS_KEY) if isinstance(loaded, dict) else None
        if isinstance(names, list) and not isinstance(names, _FileImports):
            loaded[IMPORTS_KEY] = _FileImports(names, filename)
        return loaded

    def merge_from_file(self, cfg_filename, allow_unsafe=False):
        loaded = self.load_yaml_with_base(cfg_filename, allow_unsafe=allow_unsafe)
        names = loaded.get(IMPORTS_KEY) if isinstance(loaded, dict) else None
        if isinstance(names, _FileImports):
            loaded[IMPORTS_KEY] = list(names)  # the plain list that yacs accepts
        self._check_keys(loaded, f"config file {cfg_filename}")
        try:
            self.merge_from_other_cfg(type(self)(loaded))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{cfg_filename}: {e}") from None
        if isinstance(names, _FileImports):
            self.__dict__["_imports_origin"] = f"{IMPORTS_KEY} in {names.source}"

    def imports_origin(self) -> str:
        """Where this config's ``IMPORTS`` came from: ``"IMPORTS in <file>"`` (the file of a ``_BASE_``
        chain that sets it), ``"IMPORTS on the command line"``, or ``"IMPORTS of the config"``."""
        return self.__dict__.get("_imports_origin", f"{IMPORTS_KEY} of the config")

    def merge_from_list(self, cfg_list):
        if len(cfg_list) % 2:
            raise ConfigError(f"config overrides must be KEY VALUE pairs, got an odd list: {cfg_list}")
        valid = _flat_keys(self)
        for key in cfg_list[0::2]:
            if key not in valid:
                raise ConfigError(_unknown_key_message(key, valid, "the command-line overrides"))
        for key, value in zip(cfg_list[0::2], cfg_list[1::2]):
            try:
                super().merge_from_list([key, _name_list(value) if key == IMPORTS_KEY else value])
            except (KeyError, ValueError, AssertionError) as e:
                raise ConfigError(f"command-line override {key} {value}: {_type_hint(self, key) or e}") from None
            if key == IMPORTS_KEY:
                self.__dict__["_imports_origin"] = f"{IMPORTS_KEY} on the command line"
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
