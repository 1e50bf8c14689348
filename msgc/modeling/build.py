"""``build_model(cfg)``: the classifier of the config, on ``cfg.MODEL.DEVICE``; ``check_mac_target(cfg,
model)``: whether the model's gates can reach the config's MAC target."""
import logging

from ..utils.env import check_device
from ..utils.errors import InvalidValueError
from .backbone import build_backbone
from .classifier import Classifier

__all__ = ["build_model", "check_mac_target"]

logger = logging.getLogger(__name__)


def build_model(cfg):
    """Build the :class:`Classifier` described by cfg on ``cfg.MODEL.DEVICE``.

    Weights are not loaded here: use :class:`msgc.checkpoint.MSGCCheckpointer` with ``MODEL.WEIGHTS``.
    """
    device = check_device(cfg.MODEL.DEVICE)
    model = Classifier(build_backbone(cfg), label_smoothing=cfg.MODEL.LABEL_SMOOTHING,
                       mac_loss_weight=cfg.MODEL.MSGC.LOSS_WEIGHT)
    return model.to(device)


def check_mac_target(cfg, model):
    """Refuse a ``SOLVER.MAC_TARGET.FINAL`` that the model's gates cannot reach at the training size
    (below the MAC ratio of every gate closed); warn when a model without gates, whose MACs are fixed
    (a static grouping's fraction), is given a target other than its ratio. Models without
    ``mac_ratio_range`` (e.g. a detector) are not checked."""
    if not hasattr(model, "mac_ratio_range"):
        return
    final, size = cfg.SOLVER.MAC_TARGET.FINAL, cfg.INPUT.TRAIN_SIZE
    key = "SOLVER.MAC_TARGET.FINAL="
    if cfg.MODEL.MSGC.BUDGET_RANGE:  # the lowest budget that training aims at
        final, key = min(final, cfg.MODEL.MSGC.BUDGET_RANGE[0]), "MODEL.MSGC.BUDGET_RANGE: "
    low, high = model.mac_ratio_range(size, size)
    grouping = cfg.MODEL.MSGC.GROUPING
    if high - low < 1e-9:
        if final < 1.0 and abs(final - low) > 0.02:
            logger.warning("SOLVER.MAC_TARGET.FINAL=%g has no effect: grouping '%s' has no gate, its MAC ratio is "
                           "fixed at %.4f", final, grouping, low)
        return
    if final < low:
        raise InvalidValueError(f"{key}{final:g} cannot be reached: with every gate closed, "
                                f"grouping '{grouping}' of {cfg.MODEL.BACKBONE.NAME} spends {low:.4f} of the dense "
                                f"MACs at {size}x{size}")
