"""``build_model(cfg)``: the classifier of the config, on ``cfg.MODEL.DEVICE``."""
from ..utils.env import check_device
from .backbone import build_backbone
from .classifier import Classifier

__all__ = ["build_model"]


def build_model(cfg):
    """Build the :class:`Classifier` described by cfg on ``cfg.MODEL.DEVICE``.

    Weights are not loaded here: use :class:`msgc.checkpoint.MSGCCheckpointer` with ``MODEL.WEIGHTS``.
    """
    device = check_device(cfg.MODEL.DEVICE)
    model = Classifier(build_backbone(cfg), label_smoothing=cfg.MODEL.LABEL_SMOOTHING,
                       mac_loss_weight=cfg.MODEL.MSGC.LOSS_WEIGHT)
    return model.to(device)
