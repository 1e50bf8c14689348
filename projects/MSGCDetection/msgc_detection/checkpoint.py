"""Loading weights into a detector: whole detection checkpoints, or a classifier's backbone part.

A classification checkpoint of msgc (keys ``backbone.*``), torchvision ImageNet weights or an
original MSGC release checkpoint (bare backbone keys once :mod:`msgc.checkpoint.formats` has read
them) all become detector weights by one prefix mapping: the backbone keys go under the detector's
backbone (:data:`BODY_PREFIX`), the classifier (``fc.*`` / ``classifier.*``) is dropped, and the
FPN and heads keep their fresh initialisation. A key report says what went where.
"""
import logging
from typing import Dict, Tuple

from msgc.checkpoint import MSGCCheckpointer

__all__ = ["DetectionCheckpointer", "BODY_PREFIX", "map_classification_state_dict"]

logger = logging.getLogger(__name__)

# Where the MSGC backbone sits in MSGCDetector's state dict.
BODY_PREFIX = "detector.backbone.body."
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")


def map_classification_state_dict(state_dict: Dict) -> Tuple[Dict, list]:
    """Map a classification state dict to detector keys; returns (mapped dict, dropped keys).

    Keys under ``backbone.`` are taken when there are any (an msgc classifier), otherwise every key
    (a bare backbone: torchvision or the original release); ``module.`` prefixes are stripped first.
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    if any(k.startswith("backbone.") for k in sd):
        dropped = [k for k in sd if not k.startswith("backbone.")]
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        dropped = []
    dropped += [k for k in sd if k.startswith(_CLASSIFIER_PREFIXES)]
    mapped = {BODY_PREFIX + k: v for k, v in sd.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    return mapped, dropped


def is_detection_state_dict(state_dict: Dict) -> bool:
    return any(k.startswith("detector.") for k in state_dict)


class DetectionCheckpointer(MSGCCheckpointer):
    """:class:`MSGCCheckpointer` for :class:`MSGCDetector`: detection checkpoints load as they are,
    classification weights of any format msgc reads load into the backbone (see the module doc).

    The returned extras of a classification checkpoint are dropped (its iteration, optimizer and
    scheduler belong to another training), so ``resume_or_load(weights, resume=False)`` starts a fresh
    schedule on them.
    """

    def _load_file(self, filename: str):
        checkpoint = super()._load_file(filename)
        state_dict = checkpoint["model"]
        if is_detection_state_dict(state_dict):
            return checkpoint
        mapped, dropped = map_classification_state_dict(state_dict)
        if not mapped:
            raise ValueError(f"{filename}: no backbone weights found in the checkpoint")
        self._report(filename, mapped, dropped)
        return {"model": mapped, "__msgc__": 1}

    def _report(self, filename, mapped, dropped):
        own = self.model.state_dict()
        body_keys = [k for k in own if k.startswith(BODY_PREFIX)]
        unmatched = [k[len(BODY_PREFIX):] for k in body_keys if k not in mapped]
        logger.info("%s: classification weights -> detector backbone: %d of its %d tensors loaded; "
                    "dropped %d keys (%s); the FPN and heads keep their initialisation%s", filename,
                    sum(k in own for k in mapped), len(body_keys), len(dropped), _short(dropped),
                    f"; backbone tensors without weights: {_short(unmatched)}" if unmatched else "")


def _short(keys, n=6):
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "") if keys else "none"
