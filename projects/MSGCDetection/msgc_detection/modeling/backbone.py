"""An FPN over an MSGC backbone's stages, the backbone of torchvision's detectors.

torchvision's detectors call ``backbone(images) -> OrderedDict of feature maps`` and nothing else, so
:class:`MSGCFPN` keeps the MSGC backbone's per-image MACs of its last call where the wrapping
:class:`~msgc_detection.modeling.MSGCDetector` reads them into the losses and the outputs.
"""
from collections import OrderedDict
from typing import List

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from msgc.modeling import build_backbone
from msgc.modeling.layers import AttentionGenerator, MaskGenerator
from msgc.modeling.backbone.resnet import MSGCResNet
from msgc.utils import comm
from msgc.utils.errors import InvalidValueError

__all__ = ["MSGCFPN", "build_msgc_fpn", "freeze_stages", "convert_frozen_batchnorm", "EXTRA_LEVELS"]

# Extra FPN levels above the last stage: one max-pooled level for Faster R-CNN, P6 and P7 for RetinaNet.
EXTRA_LEVELS = {"pool": 1, "p6p7": 2}


class DroppedHead(nn.Module):
    """Stands in for the classifier that a detector does not use.

    It has no parameters (so a classification checkpoint's ``fc`` has nowhere to go and is reported as
    dropped) but keeps ``in_features``: the backbone's ``head_macs`` still works, and with it the dense
    feature MACs as ``complexity().original - head_macs()``.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features

    def forward(self, x):
        raise RuntimeError("this backbone's classifier was dropped for detection; use forward_features")


def drop_classifier(body: nn.Module) -> nn.Module:
    """Replace the backbone's classifier (``fc`` or ``classifier``) by a :class:`DroppedHead`."""
    for name in ("fc", "classifier"):
        head = getattr(body, name, None)
        if head is not None:
            linear = [m for m in head.modules() if isinstance(m, nn.Linear)]
            setattr(body, name, DroppedHead(linear[-1].in_features if linear else 0))
            return body
    raise ValueError(f"{type(body).__name__} has no classifier named 'fc' or 'classifier' to drop")


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every BatchNorm2d replaced by a FrozenBatchNorm2d holding its values."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        if module.affine:
            frozen.weight.copy_(module.weight.detach())
            frozen.bias.copy_(module.bias.detach())
        if module.track_running_stats:
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new = convert_frozen_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _resnet_stages(body):
    return [[body.conv1, body.bn1]] + [[getattr(body, f"layer{i}")] for i in range(1, 5)]


def freeze_stages(body: nn.Module, freeze_at: int) -> None:
    """Stop gradients to the first ``freeze_at`` stages (1 = the stem, 2 = stem and res2, ...)."""
    if freeze_at <= 0:
        return
    if not isinstance(body, MSGCResNet):
        raise InvalidValueError(f"MODEL.DETECTOR.FREEZE_AT={freeze_at} is defined for MSGC ResNets only, "
                                f"not {type(body).__name__}; set it to 0")
    stages = _resnet_stages(body)
    if freeze_at > len(stages):
        raise InvalidValueError(f"MODEL.DETECTOR.FREEZE_AT={freeze_at}: the backbone has {len(stages)} stages")
    for modules in stages[:freeze_at]:
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)


class MSGCFPN(nn.Module):
    """An MSGC backbone (``body``) with a feature pyramid (``fpn``) on some of its stages.

    ``forward(images) -> OrderedDict`` of FPN levels named after the stages they come from, plus
    ``pool`` or ``p6``/``p7``. As a side channel for the wrapping detector, every call sets
    ``last_macs`` (N, differentiable: the per-image MACs of the backbone's features, counted as the
    paper counts them) and ``last_dense_macs`` (the dense host's feature MACs at the same input size).

    Args:
        body: a :class:`msgc.modeling.Backbone` (its classifier is not used).
        in_features: stages read by the FPN, finest first, each twice the stride of the one before.
        out_channels: channels of every level.
        extra: ``"pool"`` (one max-pooled level, Faster R-CNN) or ``"p6p7"`` (RetinaNet's P6 and P7).
    """

    def __init__(self, body: nn.Module, in_features: List[str], out_channels: int, extra: str = "pool"):
        super().__init__()
        _check_in_features(body, in_features)
        if extra not in EXTRA_LEVELS:
            raise InvalidValueError(f"unknown extra FPN levels '{extra}'; use one of {sorted(EXTRA_LEVELS)}")
        self.body = body
        self.in_features = list(in_features)
        extra_block = LastLevelMaxPool() if extra == "pool" else LastLevelP6P7(out_channels, out_channels)
        self.fpn = FeaturePyramidNetwork([body.stage_channels[f] for f in in_features], out_channels,
                                         extra_blocks=extra_block)
        self.out_channels = out_channels  # read by torchvision's detectors
        self.num_levels = len(in_features) + EXTRA_LEVELS[extra]
        self.last_macs = None
        self.last_dense_macs = None
        self._dense_cache = {}

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        stages, macs = self.body.forward_features(images)
        self.last_macs = macs
        self.last_dense_macs = self.dense_macs(images.shape[-2:], stages[next(reversed(stages))].shape[-2:])
        return self.fpn(OrderedDict((f, stages[f]) for f in self.in_features))

    def dense_macs(self, size, last_size) -> float:
        """The dense host's feature MACs (no classifier) at input ``size``; ``last_size``: its last stage's."""
        key = (int(size[0]), int(size[1]))
        if key not in self._dense_cache:
            whole = self.body.complexity(*key).original
            self._dense_cache[key] = float(whole - self.body.head_macs(int(last_size[0]), int(last_size[1])))
        return self._dense_cache[key]


def _check_in_features(body, in_features):
    if not in_features:
        raise InvalidValueError("MODEL.DETECTOR.IN_FEATURES is empty; name the backbone stages the FPN reads")
    for f in in_features:
        if f not in body.stage_channels:
            raise InvalidValueError(f"MODEL.DETECTOR.IN_FEATURES names '{f}', which {type(body).__name__} does not "
                                    f"have; its stages: {', '.join(body.stage_channels)}")
    strides = [body.stage_strides[f] for f in in_features]
    if any(b != 2 * a for a, b in zip(strides, strides[1:])):
        raise InvalidValueError(f"MODEL.DETECTOR.IN_FEATURES {list(in_features)} have strides {strides}; an FPN "
                                "needs each stage at twice the stride of the one before")


def _normalise(module: nn.Module, norm: str, key: str) -> nn.Module:
    if norm == "FrozenBN":
        return convert_frozen_batchnorm(module)
    if norm == "SyncBN":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module) if comm.get_world_size() > 1 else module
    if norm != "BN":
        raise InvalidValueError(f"{key} must be 'FrozenBN', 'BN' or 'SyncBN', got '{norm}'")
    return module


def build_msgc_fpn(cfg, extra: str) -> MSGCFPN:
    """The configured MSGC backbone without its classifier, normalised and frozen as configured, with an FPN."""
    det = cfg.MODEL.DETECTOR
    body = drop_classifier(build_backbone(cfg))
    if det.GATE_NORM not in ("", "FrozenBN"):
        raise InvalidValueError(f"MODEL.DETECTOR.GATE_NORM must be '' (as NORM) or 'FrozenBN', got '{det.GATE_NORM}'")
    if det.GATE_NORM == "FrozenBN":
        for m in body.modules():
            if isinstance(m, (MaskGenerator, AttentionGenerator)):
                m.conv = convert_frozen_batchnorm(m.conv)
    body = _normalise(body, det.NORM, "MODEL.DETECTOR.NORM")
    freeze_stages(body, det.FREEZE_AT)
    return MSGCFPN(body, det.IN_FEATURES, det.FPN_CHANNELS, extra)
