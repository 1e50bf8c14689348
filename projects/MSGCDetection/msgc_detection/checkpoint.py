"""Loading weights into a detector: whole detection checkpoints, or a classifier's backbone part.

A classification checkpoint of msgc (keys ``backbone.*``), torchvision ImageNet weights or an
original MSGC release checkpoint become detector weights by one prefix mapping: the backbone's keys go
under the detector's backbone (:data:`BODY_PREFIX`), the classifier (``fc.*`` / ``classifier.*``) is
dropped, and the FPN and heads keep their fresh initialisation. :mod:`msgc.checkpoint.formats` reads
the file and re-keys foreign formats under the model's :class:`~msgc.modeling.Backbone` (which is
:data:`BODY_PREFIX` here); this module re-keys msgc classifiers the same way and drops what a detector
has no place for. The core checkpointer then checks that every host tensor of the backbone is covered.
"""
import logging
from typing import Dict, Tuple

from msgc.checkpoint import MSGCCheckpointer
from msgc.checkpoint import CheckpointError
from msgc.checkpoint.formats import LOAD_INFO_KEY, LoadInfo

__all__ = ["DetectionCheckpointer", "BODY_PREFIX", "map_classification_state_dict"]

logger = logging.getLogger(__name__)

# Where the MSGC backbone sits in MSGCDetector's state dict.
BODY_PREFIX = "detector.backbone.body."
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def map_classification_state_dict(state_dict: Dict, model_keys=None) -> Tuple[Dict, list]:
    """Map a classification state dict to detector keys; returns (mapped dict, dropped keys).

    Keys under ``backbone.`` are taken when there are any (an msgc classifier), otherwise every key
    (a bare backbone); ``module.`` prefixes are stripped first. The classifier is dropped, and so is a
    ``num_batches_tracked`` counter where ``model_keys`` (the detector's keys) has none: frozen
    BatchNorm keeps no counter.
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    dropped = []
    if any(k.startswith("backbone.") for k in sd):
        dropped = [k for k in sd if not k.startswith("backbone.")]
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    mapped = {}
    for k, v in sd.items():
        key = BODY_PREFIX + k
        if k.startswith(_CLASSIFIER_PREFIXES) or (
                model_keys is not None and k.endswith("num_batches_tracked") and key not in model_keys):
            dropped.append(k)
        else:
            mapped[key] = v
    return mapped, dropped


def _is_detection_checkpoint(checkpoint) -> bool:
    info = checkpoint.get(LOAD_INFO_KEY)
    own_format = info is None or info.format == "msgc"
    return own_format and any(k.startswith("detector.") for k in checkpoint["model"])


class DetectionCheckpointer(MSGCCheckpointer):
    """:class:`MSGCCheckpointer` for :class:`MSGCDetector`.

    Detection checkpoints (this project's, keys ``detector.*``) load as they are. Classification
    weights of any format msgc reads load into the backbone: the classifier is dropped, every host
    tensor of the backbone must be in the file (else an error naming the key), the FPN and heads keep
    their initialisation, and a line reports what was loaded and dropped. The extras of a
    classification checkpoint (iteration, optimizer, ...) belong to another training and are dropped,
    so ``resume_or_load(weights, resume=False)`` starts a fresh schedule on them.
    """

    def _load_file(self, filename: str):
        checkpoint = super()._load_file(filename)
        if _is_detection_checkpoint(checkpoint):
            return checkpoint
        info = checkpoint.get(LOAD_INFO_KEY) or LoadInfo(filename, "msgc", "")
        state_dict = checkpoint["model"]
        if info.format != "msgc":  # formats put the backbone's keys under BODY_PREFIX already
            state_dict = {k[len(BODY_PREFIX):]: v for k, v in state_dict.items()}
        mapped, dropped = map_classification_state_dict(state_dict, set(self.model.state_dict()))
        if not mapped:
            raise CheckpointError(f"{info.path}: no backbone weights in this checkpoint")
        counters = [k for k in dropped if k.endswith("num_batches_tracked")]
        others = [k for k in dropped if k not in counters]
        logger.info("%s (%s): classification weights -> detector backbone: %d tensors; dropped: %s and %d "
                    "BatchNorm batch counters; the FPN and heads keep their initialisation", info.path,
                    info.format, len(mapped), _short(others), len(counters))
        return {"model": mapped, LOAD_INFO_KEY: LoadInfo(info.path, info.format, BODY_PREFIX)}


def _short(keys, n=6):
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
