"""Detectors: torchvision's Faster R-CNN and RetinaNet on an MSGC FPN, wrapped to add the MAC loss.

``DETECTOR_REGISTRY`` holds one builder per detector; :func:`build_detector` calls the configured one.
"""
import logging
from typing import Dict, List, Optional

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign

from msgc.modeling.layers import BinaryGate
from msgc.utils.errors import InvalidValueError
from msgc.utils.registry import Registry

from .backbone import MSGCFPN, build_msgc_fpn

logger = logging.getLogger(__name__)

__all__ = ["DETECTOR_REGISTRY", "MSGCDetector", "build_detector", "mac_loss"]

DETECTOR_REGISTRY = Registry("DETECTOR")
DETECTOR_REGISTRY.__doc__ = """
Registry for detectors, selected by ``MODEL.DETECTOR.NAME``.

An entry is a callable ``entry(cfg) -> MSGCDetector``: it builds the MSGC FPN backbone
(:func:`build_msgc_fpn`), a torchvision detector on it, and wraps that in :class:`MSGCDetector` with
the label offset of the detector (1 where class 0 is the background).
"""

# torchvision's loss names -> names the trainer recognises as losses (prefix "loss_")
_LOSS_NAMES = {"classification": "loss_cls", "bbox_regression": "loss_box_reg"}


def mac_loss(ratio: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """The paper's sparsity loss: ``weight * (ratio - target)`` while the ratio is at or above target, else 0."""
    if ratio.detach().item() >= target.item():
        return weight * (ratio - target)
    return ratio.new_zeros(())


class MSGCDetector(nn.Module):
    """A torchvision detector over an :class:`MSGCFPN`, with the backbone's MAC loss and metrics.

    torchvision's detectors return only their own losses; this wrapper reads the backbone's per-image
    MACs (kept by :class:`MSGCFPN` during the forward pass) and adds the sparsity loss and MAC metrics.

    - Train mode: ``model(images, targets)`` -> the detector's losses (every key starting with
      ``loss_``), ``loss_macs``, and detached metrics ``mac_ratio``, ``mac_target``, ``gate_open``.
    - Eval mode: ``model(images)`` -> one dict per image: ``boxes`` (x1, y1, x2, y2 in input pixels),
      ``scores``, ``labels`` (0 .. num_classes-1), ``macs`` (the image's backbone MACs) and
      ``dense_macs`` (the dense host's backbone MACs at the same size).

    ``images`` is a list of 3 x H x W float tensors in [0, 1] (normalised and resized inside the
    detector); ``targets`` a list of dicts with ``boxes`` (float n x 4, x1 y1 x2 y2) and ``labels``
    (int64 n, 0 .. num_classes-1). Both are moved to the model's device. The MAC ratio is measured on the
    padded batch tensor that the backbone sees; the MAC target is set from outside (the trainer's
    schedule) through :meth:`set_mac_target`.

    Args:
        detector: a torchvision detector whose ``backbone`` is an :class:`MSGCFPN`.
        num_classes: object classes (no background).
        label_offset: added to the labels the detector sees (1 when its class 0 is the background).
        mac_loss_weight: lambda of the sparsity loss.
        train_sizes / max_size_train: shorter-side sizes drawn per image in training, and the cap of
            the longer side; test_size / max_size_test: the same at test time.
    """

    def __init__(self, detector: nn.Module, *, num_classes: int, label_offset: int, mac_loss_weight: float,
                 train_sizes=(800,), max_size_train=1333, test_size=800, max_size_test=1333):
        super().__init__()
        if not isinstance(detector.backbone, MSGCFPN):
            raise TypeError(f"MSGCDetector needs a detector whose backbone is an MSGCFPN, got "
                            f"{type(detector.backbone).__name__}")
        self.detector = detector
        self.num_classes = num_classes
        self.label_offset = label_offset
        self.mac_loss_weight = mac_loss_weight
        self._sizes = {True: (tuple(train_sizes), max_size_train), False: ((test_size,), max_size_test)}
        self.register_buffer("mac_target", torch.tensor(1.0), persistent=False)
        self.train(self.training)

    @property
    def backbone(self) -> nn.Module:
        """The MSGC backbone (a :class:`msgc.modeling.Backbone`) under the FPN."""
        return self.detector.backbone.body

    @property
    def device(self) -> torch.device:
        return self.mac_target.device

    def train(self, mode: bool = True):
        super().train(mode)
        self.detector.transform.min_size, self.detector.transform.max_size = self._sizes[bool(mode)]
        return self

    def set_mac_target(self, target: float):
        """The current MAC target as a fraction of the dense host backbone's MACs."""
        self.mac_target.fill_(float(target))

    def forward(self, images: List[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None):
        images = [img.to(self.device) for img in images]
        if not self.training:
            return self.inference(images)
        if targets is None:
            raise ValueError("a detector in training mode needs targets: call model(images, targets), "
                             "or model.eval() for inference")
        targets = [self._prepare_target(i, t) for i, t in enumerate(targets)]
        losses = self.detector(images, targets)
        out = {_LOSS_NAMES.get(k, k): v for k, v in losses.items()}
        out.update(self._mac_terms())
        return out

    def inference(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        detections = self.detector(images)
        macs, dense = self._take_macs()
        for det, m in zip(detections, macs.detach()):
            det["labels"] = det["labels"] - self.label_offset
            det["macs"] = m
            det["dense_macs"] = dense
        return detections

    def _take_macs(self):
        fpn = self.detector.backbone
        macs, dense = fpn.last_macs, fpn.last_dense_macs
        if macs is None:
            raise RuntimeError("the backbone did not run during the detector's forward pass")
        fpn.last_macs = fpn.last_dense_macs = None  # never read a stale value twice
        return macs, dense

    def _mac_terms(self):
        macs, dense = self._take_macs()
        ratio = macs.mean() / dense
        out = {"mac_ratio": ratio.detach(), "mac_target": self.mac_target.clone()}
        if ratio.requires_grad:
            out["loss_macs"] = mac_loss(ratio, self.mac_target, self.mac_loss_weight)
        elif not getattr(self, "_said_no_gates", False):  # no gate (or frozen ones): the loss could not act
            self._said_no_gates = True
            logger.info("the backbone's MACs depend on no trained parameter (no gate, or frozen gates): training "
                        "without the sparsity loss loss_macs")
        gates = [m.last_open for m in self.backbone.modules() if isinstance(m, BinaryGate) and hasattr(m, "last_open")]
        if gates:
            out["gate_open"] = torch.stack(gates).mean()
        return out

    def _prepare_target(self, index: int, target: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Check one image's target and move it to the device with the detector's label numbering."""
        where = f"target of image {index}" + (f" (image_id {int(target['image_id'])})" if "image_id" in target else "")
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=self.device).reshape(-1, 4)
        labels = torch.as_tensor(target["labels"], dtype=torch.int64, device=self.device).reshape(-1)
        if boxes.size(0) != labels.size(0):
            raise InvalidValueError(f"{where}: {boxes.size(0)} boxes but {labels.size(0)} labels")
        bad = ~torch.isfinite(boxes).all(1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            raise InvalidValueError(f"{where}: box {boxes[bad][0].tolist()} is not finite or has no area "
                                    "(boxes are x1, y1, x2, y2 with x2 > x1 and y2 > y1)")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise InvalidValueError(f"{where}: label {labels[(labels < 0) | (labels >= self.num_classes)][0].item()} "
                                    f"is outside 0..{self.num_classes - 1} (MODEL.NUM_CLASSES={self.num_classes})")
        return {"boxes": boxes, "labels": labels + self.label_offset}


def _anchor_generator(cfg, num_levels: int) -> AnchorGenerator:
    sizes = [tuple(int(s) for s in level) for level in cfg.MODEL.DETECTOR.ANCHOR_SIZES]
    if len(sizes) != num_levels:
        raise InvalidValueError(f"MODEL.DETECTOR.ANCHOR_SIZES has {len(sizes)} levels but the FPN has {num_levels} "
                                f"({len(cfg.MODEL.DETECTOR.IN_FEATURES)} stages of IN_FEATURES and its extra levels)")
    ratios = tuple(float(r) for r in cfg.MODEL.DETECTOR.ANCHOR_ASPECT_RATIOS)
    return AnchorGenerator(tuple(sizes), (ratios,) * num_levels)


def _wrap(cfg, detector, label_offset):
    i = cfg.INPUT
    return MSGCDetector(detector, num_classes=cfg.MODEL.NUM_CLASSES, label_offset=label_offset,
                        mac_loss_weight=cfg.MODEL.MSGC.LOSS_WEIGHT, train_sizes=i.MIN_SIZE_TRAIN,
                        max_size_train=i.MAX_SIZE_TRAIN, test_size=i.MIN_SIZE_TEST, max_size_test=i.MAX_SIZE_TEST)


def _transform_args(cfg):
    i = cfg.INPUT
    return dict(min_size=tuple(i.MIN_SIZE_TRAIN), max_size=i.MAX_SIZE_TRAIN,
                image_mean=list(i.PIXEL_MEAN), image_std=list(i.PIXEL_STD))


@DETECTOR_REGISTRY.register("faster_rcnn")
def build_faster_rcnn(cfg) -> MSGCDetector:
    """Faster R-CNN with an FPN (and a max-pooled extra level for the RPN) over the MSGC backbone."""
    fpn = build_msgc_fpn(cfg, extra="pool")
    anchors = _anchor_generator(cfg, fpn.num_levels)
    rpn, roi, dim = cfg.MODEL.RPN, cfg.MODEL.ROI_HEADS, cfg.MODEL.ROI_HEADS.BOX_HEAD_DIM
    pooler = MultiScaleRoIAlign(featmap_names=list(fpn.in_features), output_size=7, sampling_ratio=2)
    detector = FasterRCNN(
        fpn, num_classes=None, **_transform_args(cfg),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=rpn.PRE_NMS_TOPK_TRAIN, rpn_pre_nms_top_n_test=rpn.PRE_NMS_TOPK_TEST,
        rpn_post_nms_top_n_train=rpn.POST_NMS_TOPK_TRAIN, rpn_post_nms_top_n_test=rpn.POST_NMS_TOPK_TEST,
        rpn_nms_thresh=rpn.NMS_THRESH, rpn_batch_size_per_image=rpn.BATCH_SIZE_PER_IMAGE,
        box_roi_pool=pooler, box_head=TwoMLPHead(fpn.out_channels * 7 * 7, dim),
        box_predictor=FastRCNNPredictor(dim, cfg.MODEL.NUM_CLASSES + 1),
        box_score_thresh=roi.SCORE_THRESH_TEST, box_nms_thresh=roi.NMS_THRESH_TEST,
        box_detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE,
        box_batch_size_per_image=roi.BATCH_SIZE_PER_IMAGE, box_positive_fraction=roi.POSITIVE_FRACTION)
    return _wrap(cfg, detector, label_offset=1)


@DETECTOR_REGISTRY.register("retinanet")
def build_retinanet(cfg) -> MSGCDetector:
    """RetinaNet with an FPN (and P6, P7 from P5) over the MSGC backbone."""
    fpn = build_msgc_fpn(cfg, extra="p6p7")
    anchors = _anchor_generator(cfg, fpn.num_levels)
    head = RetinaNetHead(fpn.out_channels, anchors.num_anchors_per_location()[0], cfg.MODEL.NUM_CLASSES)
    r = cfg.MODEL.RETINANET
    detector = RetinaNet(
        fpn, num_classes=cfg.MODEL.NUM_CLASSES, **_transform_args(cfg), anchor_generator=anchors, head=head,
        score_thresh=r.SCORE_THRESH_TEST, nms_thresh=r.NMS_THRESH_TEST,
        detections_per_img=cfg.TEST.DETECTIONS_PER_IMAGE, topk_candidates=r.TOPK_CANDIDATES_TEST)
    return _wrap(cfg, detector, label_offset=0)


def build_detector(cfg) -> MSGCDetector:
    """Build the detector named by ``cfg.MODEL.DETECTOR.NAME`` on ``cfg.MODEL.DEVICE`` (weights not loaded)."""
    model = DETECTOR_REGISTRY.get(cfg.MODEL.DETECTOR.NAME)(cfg)
    return model.to(torch.device(cfg.MODEL.DEVICE))
