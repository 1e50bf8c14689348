"""Checkpoint formats msgc reads, recognised from a file's contents (never from its name).

================  ==============================================================================
format            what the file holds
================  ==============================================================================
``msgc``          this project's checkpoint: ``{"__msgc__": 1, "model": state dict, ...extras}``,
                  keys in the namespace of the whole model (``backbone.conv1.weight``, ...)
``msgc-release``  a checkpoint of the original MSGC code release: ``{"state_dict": {...}, "epoch",
                  "best_prec1", "optimizer"}``, saved from a DistributedDataParallel model, so every
                  key starts with ``module.``
``torchvision``   a flat ``{key: tensor}`` state dict of a torchvision classifier (resnet18/34/50/101,
                  mobilenet_v2)
================  ==============================================================================

The two foreign formats hold a *backbone's* weights. msgc's backbones use torchvision's keys for the
host network and the release's keys for the generators (``maskgen*``, ``attgen*``), so reading them is
only re-keying: drop ``module.``, then prefix the path of the model's :class:`Backbone` (``backbone.``
in a :class:`Classifier`). Nothing else is renamed, which is why a key that does not fit is a sign of
weights for another architecture, never something to map around.

Files are read with ``torch.load(weights_only=True)``: a checkpoint is data, not code. Foreign files
give weights only; their epoch, accuracy and optimizer state are not returned.
"""
import logging
import os
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from tabulate import tabulate

from ..utils.errors import InvalidValueError
from ..utils.file_io import get_local_path

__all__ = [
    "CheckpointError",
    "LoadInfo",
    "LOAD_INFO_KEY",
    "read_checkpoint",
    "detect_format",
    "load_checkpoint_file",
    "convert_to_msgc",
    "backbone_state_dict",
    "backbone_prefix",
    "is_generator_key",
    "guess_architecture",
    "check_fit",
    "incompatible_keys_table",
]

logger = logging.getLogger(__name__)

LOAD_INFO_KEY = "__load_info__"
_GENERATOR_PREFIXES = ("maskgen", "attgen")
_FORMAT_NAMES = {
    "msgc": "msgc checkpoint",
    "msgc-release": "original MSGC release checkpoint",
    "torchvision": "torchvision state dict",
}


class CheckpointError(InvalidValueError):
    """A checkpoint cannot be read, has an unknown format, or does not fit the model."""


class LoadInfo(NamedTuple):
    """Where weights come from and which model keys they must cover.

    Attributes:
        path: the file, for messages.
        format: one of ``msgc``, ``msgc-release``, ``torchvision``.
        scope: prefix of the model keys that the file must provide (every host key under it); ""
            for this project's checkpoints, which cover the whole model.
    """

    path: str
    format: str
    scope: str


def read_checkpoint(path: str) -> Any:
    """``torch.load(weights_only=True)`` of a local path or URL; any failure is one clear line."""
    local = get_local_path(path)  # a URL that cannot be fetched: DownloadError
    try:
        with open(local, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch.load raises many types for corrupt or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {_read_error_reason(e)}") from e


def _read_error_reason(e: Exception) -> str:
    text = str(e).strip()
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it holds Python objects ({found.group(1)}) that a safe load (weights_only=True) refuses; "
                "save a dict of tensors instead")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = detail.group(1).strip() if detail else (text.splitlines()[0] if text else "end of file")
    return f"not a PyTorch file, or a truncated one ({type(e).__name__}: {first.split('. ')[0]})"


def _is_tensor_dict(obj) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _describe(obj) -> str:
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if not obj:
        return "an empty dict"
    keys = list(obj)
    shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"a dict with keys {shown}"


def detect_format(data, path: str = "<checkpoint>") -> str:
    """The format of a loaded checkpoint (see the module docstring); unknown ones are an error."""
    if isinstance(data, dict) and "__msgc__" in data:
        if not _is_tensor_dict(data.get("model")):
            raise CheckpointError(f"{path}: an msgc checkpoint whose 'model' is not a dict of tensors")
        return "msgc"
    if isinstance(data, dict) and "state_dict" in data:
        if not _is_tensor_dict(data["state_dict"]):
            raise CheckpointError(f"{path}: has a 'state_dict' entry that is not a dict of tensors, "
                                  "so it is not an original MSGC release checkpoint")
        return "msgc-release"
    if _is_tensor_dict(data):
        return "torchvision"
    raise CheckpointError(
        f"{path}: unknown checkpoint format, {_describe(data)}; msgc reads its own checkpoints (a dict "
        "with '__msgc__' and 'model'), original MSGC release checkpoints (a dict with 'state_dict') and "
        "torchvision state dicts (a flat dict of tensors)")


def _strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    if all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def backbone_state_dict(data, fmt: str) -> Dict[str, torch.Tensor]:
    """The backbone-level state dict held by a foreign checkpoint (``msgc-release`` or ``torchvision``)."""
    if fmt == "msgc-release":
        return _strip_module_prefix(data["state_dict"])
    if fmt == "torchvision":
        return _strip_module_prefix(data)
    raise ValueError(f"'{fmt}' is not a foreign checkpoint format")


def backbone_prefix(model) -> str:
    """The key prefix of the model's :class:`Backbone` ("" if the model is one, or has none).

    Foreign weights are put under this prefix, and must cover every host key under it.
    """
    from ..modeling.backbone import Backbone

    if model is None or isinstance(model, Backbone):
        return ""
    names = [n for n, m in model.named_modules() if isinstance(m, Backbone)]
    outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    if len(outer) > 1:
        raise CheckpointError(
            f"the model has several backbones ({', '.join(outer)}): load foreign weights into one of "
            "them, e.g. MSGCCheckpointer(model.<name>)")
    return outer[0] + "." if outer else ""


def load_checkpoint_file(path: str, model=None, display_path: Optional[str] = None) -> dict:
    """Read ``path`` and return ``{"model": state dict in the model's namespace, ...extras}``.

    The result also holds a :class:`LoadInfo` under :data:`LOAD_INFO_KEY` for the checkpointer's
    checks and messages. ``display_path`` names the file in messages (e.g. a URL whose local copy is
    ``path``).
    """
    name = display_path or path
    data = read_checkpoint(path)
    fmt = detect_format(data, name)
    if fmt == "msgc":
        out = dict(data)
        scope = ""
    else:
        scope = backbone_prefix(model)
        out = {"model": {scope + k: v for k, v in backbone_state_dict(data, fmt).items()}}
        if fmt == "msgc-release" and "epoch" in data:
            logger.info("%s: original MSGC release checkpoint of epoch %s (top-1 %s); its optimizer "
                        "state is not loaded", name, data.get("epoch"), data.get("best_prec1", "?"))
    out[LOAD_INFO_KEY] = LoadInfo(name, fmt, scope)
    return out


def convert_to_msgc(path: str, prefix: str = "backbone.") -> Tuple[dict, str]:
    """Read a foreign checkpoint and return (an msgc checkpoint dict, the source format).

    The state dict is re-keyed under ``prefix`` (``backbone.``: the namespace of the classifier
    :func:`msgc.modeling.build_model` builds). An msgc checkpoint is an error: nothing to convert.
    """
    data = read_checkpoint(path)
    fmt = detect_format(data, path)
    if fmt == "msgc":
        raise CheckpointError(f"{path} is already an msgc checkpoint; nothing to convert")
    state = {prefix + k: v for k, v in backbone_state_dict(data, fmt).items()}
    return {"__msgc__": 1, "model": state, "converted_from": {"format": fmt, "file": os.path.basename(path)}}, fmt


def is_generator_key(key: str) -> bool:
    """Whether a state-dict key belongs to a mask or attention generator (not the host network)."""
    return any(part.startswith(_GENERATOR_PREFIXES) for part in key.split("."))


def _ignorable(key: str) -> bool:
    """BatchNorm's batch counter: old torchvision files lack it and eval never reads it."""
    return key.endswith("num_batches_tracked")


def guess_architecture(keys) -> Optional[str]:
    """A short name of the host network whose (backbone-level) keys these are, or None."""
    keys = set(keys)
    if "features.init_conv.weight" in keys:
        return "DenseNet-74 (CondenseNet host)"
    if "layer1.0.conv1.weight" in keys:
        blocks = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in keys
        known = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                 ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101"}
        kind = "bottleneck" if bottleneck else "basic"
        return known.get((blocks, bottleneck), f"a ResNet with {kind} blocks {list(blocks)}")
    if "features.0.0.weight" in keys and "classifier.1.weight" in keys:
        return "mobilenet_v2"
    return None


def _examples(keys: List[str], scope: str, n: int = 3) -> str:
    shown = ", ".join(repr(k[len(scope):]) for k in keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def _mismatch_hint(model_keys, given_keys, scope: str) -> str:
    strip = lambda ks: [k[len(scope):] for k in ks if k.startswith(scope)]  # noqa: E731
    file_arch, model_arch = guess_architecture(strip(given_keys)), guess_architecture(strip(model_keys))
    if file_arch and model_arch and file_arch != model_arch:
        return f"; the file holds {file_arch} weights but the model is a {model_arch}: check MODEL.BACKBONE.NAME"
    return "; weights for another architecture? check MODEL.BACKBONE.NAME"


def check_fit(model_state: Dict[str, torch.Tensor], state: Dict[str, torch.Tensor],
              info: LoadInfo) -> Tuple[List[str], List[str]]:
    """Check that weights fit the model before anything is loaded; return (missing, unexpected) keys.

    Errors (:class:`CheckpointError`, one line naming the file):

    - a host key of the model (under ``info.scope``, generators excluded) that the file lacks, or a
      host key in the file that the model lacks: weights for another architecture;
    - a tensor whose shape differs from the model's: the message names the key.

    Generator keys (``maskgen*``, ``attgen*``) may be missing (torchvision weights have none: the
    generators keep their initialisation) or unexpected (a gated checkpoint loaded into a dense or
    attention-free model); they are returned for the log. ``num_batches_tracked`` is ignored.
    """
    model_keys = set(model_state)
    missing = sorted(k for k in model_keys - set(state) if k.startswith(info.scope) and not _ignorable(k))
    unexpected = sorted(k for k in set(state) - model_keys)
    host_missing = [k for k in missing if not is_generator_key(k)]
    host_unexpected = [k for k in unexpected if not is_generator_key(k)]
    what = f"{info.path}: this {_FORMAT_NAMES[info.format]} does not fit the model"
    if host_missing or host_unexpected:
        parts = []
        if host_missing:
            parts.append(f"{len(host_missing)} host tensors missing ({_examples(host_missing, info.scope)})")
        if host_unexpected:
            parts.append(f"{len(host_unexpected)} unexpected ({_examples(host_unexpected, info.scope)})")
        raise CheckpointError(f"{what}: {' and '.join(parts)}{_mismatch_hint(model_keys, state, info.scope)}")
    for key in (k for k in model_state if k in state):  # the model's order: the first layer first
        want, got = tuple(model_state[key].shape), tuple(state[key].shape)
        if want != got:
            raise CheckpointError(
                f"{what}: '{key[len(info.scope):]}' has shape {got} in the file but the model's "
                f"'{key}' is {want}: weights for another architecture, width or number of classes")
    return missing, unexpected


def _group(keys: List[str]) -> Dict[str, List[str]]:
    """Keys grouped by module: a generator's tensors under the generator, others under their module."""
    groups: Dict[str, List[str]] = {}
    for key in keys:
        parts = key.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.startswith(_GENERATOR_PREFIXES)), len(parts) - 1)
        groups.setdefault(".".join(parts[:cut]), []).append(".".join(parts[cut:]))
    return groups


def incompatible_keys_table(missing: List[str], unexpected: List[str]) -> str:
    """A table of missing and unexpected keys, one row per module."""
    rows = []
    for status, keys in (("missing", missing), ("unexpected", unexpected)):
        for module, tensors in _group(keys).items():
            kind = "generator" if is_generator_key(module) else "host"
            names = ", ".join(tensors) if len(tensors) <= 4 else f"{len(tensors)} tensors"
            rows.append((status, kind, module, names))
    return tabulate(rows, headers=["status", "kind", "module", "tensors"], tablefmt="pipe")
