"""The classification model: a backbone, the classification loss and the sparsity (MAC) loss."""
import logging
import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..utils.errors import InvalidValueError
from .layers import BinaryGate, mask_generators, set_gate_thresholds

__all__ = ["Classifier"]

logger = logging.getLogger(__name__)


class Classifier(nn.Module):
    """Wraps a :class:`Backbone` with the paper's losses.

    Eval mode: ``model(images)`` -> ``{"logits": N x classes, "macs": N}``.
    Train mode: ``model(images, labels)`` -> ``{"loss_cls", "loss_macs"}`` plus detached metrics
    (``mac_ratio``, ``mac_target``, ``gate_open``) under keys without the ``loss_`` prefix. A backbone
    whose MACs do not depend on any trained parameter (no gate: grouping "dense", or a registered
    backbone without MSGC layers) gets no ``loss_macs``, which could not change it; the first such
    forward pass logs it.
    The MAC target is set from outside (the trainer's schedule) through :meth:`set_mac_target`.

    Args:
        backbone: the network.
        label_smoothing: of the cross-entropy loss.
        mac_loss_weight: lambda of ``lambda * (mean MACs / dense MACs - target)``, applied while the
            batch's MAC ratio is at or above the target.
    """

    def __init__(self, backbone, label_smoothing: float = 0.1, mac_loss_weight: float = 30.0):
        super().__init__()
        self.backbone = backbone
        self.label_smoothing = label_smoothing
        self.mac_loss_weight = mac_loss_weight
        self.register_buffer("mac_target", torch.tensor(1.0), persistent=False)
        self._dense_macs = {}
        self._image_targets = self._target_groups = None

    def set_mac_target(self, target, groups: Optional[torch.Tensor] = None):
        """The current MAC target as a fraction of the dense host's MACs: one number, or (a model trained
        for a range of budgets) one per image of the next batch with ``groups``, a group index per image
        (see :meth:`losses`)."""
        if isinstance(target, torch.Tensor) and target.dim() > 0:
            self._image_targets, self._target_groups = target.detach().double(), groups
            self.mac_target.fill_(float(target.mean()))
        else:
            self._image_targets = self._target_groups = None
            self.mac_target.fill_(float(target))

    def dense_macs(self, h: int, w: int) -> int:
        """The dense host's MACs at input size h x w."""
        key = (int(h), int(w))
        if key not in self._dense_macs:
            self._dense_macs[key] = self.backbone.complexity(*key).original
        return self._dense_macs[key]

    @torch.no_grad()
    def mac_ratio_range(self, h: int, w: int) -> tuple:
        """``(lowest, highest)`` MAC ratio the gates can reach on an ``h x w`` image: with every gate
        closed and with every gate open (the same number for a model without gates, whose MACs are
        fixed: the dense host's 1.0, a static grouping's fraction)."""
        device = next(self.parameters()).device
        image = torch.zeros(1, 3, int(h), int(w), device=device)
        generators = mask_generators(self)
        was_training, before = self.training, [g.gate.threshold for g in generators]
        self.eval()
        try:
            ratios = []
            for threshold in (math.inf, -math.inf):
                set_gate_thresholds(self, threshold)
                ratios.append(float(self.backbone(image)[1][0]) / self.dense_macs(h, w))
                if not generators:
                    break
        finally:
            for g, t in zip(generators, before):
                g.gate.threshold = t
            self.train(was_training)
        return min(ratios), max(ratios)

    def forward(self, images, labels=None):
        logits, macs = self.backbone(images)
        if not self.training:
            return {"logits": logits, "macs": macs.detach()}
        if labels is None:
            raise ValueError("a model in training mode needs labels: call model(images, labels), "
                             "or model.eval() for inference")
        return self.losses(logits, macs, labels, images.shape[-2:])

    def losses(self, logits, macs, labels, size):
        """Classification and sparsity losses, with the MAC metrics worth logging."""
        num_classes = logits.size(1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
            raise InvalidValueError(f"label {bad} is out of range for MODEL.NUM_CLASSES={num_classes}")
        loss_cls = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        ratio = macs.mean() / self.dense_macs(*size)
        target = self.mac_target
        out = {"loss_cls": loss_cls, "mac_ratio": ratio.detach(), "mac_target": target.clone()}
        if not ratio.requires_grad:
            self._say_no_gates()
        elif self._image_targets is not None:
            out["loss_macs"] = self._grouped_mac_loss(macs / self.dense_macs(*size))
        elif ratio.detach().item() >= target.item():
            out["loss_macs"] = self.mac_loss_weight * (ratio - target)
        else:
            out["loss_macs"] = ratio.new_zeros(())
        gate_open = self.gate_open_ratio()
        if gate_open is not None:
            out["gate_open"] = gate_open
        return out

    def _grouped_mac_loss(self, ratios: torch.Tensor) -> torch.Tensor:
        """The sparsity loss of per-image targets: per group of images, ``lambda * (mean ratio - mean
        target)`` while the group is above its target, weighted by the group's share of the batch (one
        group: the paper's loss)."""
        targets = self._image_targets.to(ratios.device)
        if targets.numel() != ratios.numel():
            raise InvalidValueError(f"{targets.numel()} MAC targets for a batch of {ratios.numel()} images")
        groups = torch.zeros_like(targets, dtype=torch.long) if self._target_groups is None else self._target_groups
        loss = ratios.new_zeros(())
        for g in torch.unique(groups).tolist():
            member = (groups == g).to(ratios.device)
            excess = ratios[member].mean() - targets[member].mean().to(ratios.dtype)
            if excess.detach().item() >= 0:
                loss = loss + self.mac_loss_weight * excess * (member.sum() / ratios.numel())
        return loss

    def _say_no_gates(self):
        if not getattr(self, "_said_no_gates", False):
            self._said_no_gates = True
            logger.info("%s has no gate (its MACs depend on no trained parameter): training without the "
                        "sparsity loss loss_macs; MODEL.MSGC.LOSS_WEIGHT and the MAC target have no effect",
                        type(self.backbone).__name__)

    def gate_open_ratio(self):
        """Mean fraction of open gates over the gates of the last forward pass (None if no gate)."""
        values = [m.last_open for m in self.modules() if isinstance(m, BinaryGate) and hasattr(m, "last_open")]
        return torch.stack(values).mean() if values else None
