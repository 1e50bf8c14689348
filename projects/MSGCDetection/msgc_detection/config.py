"""The config keys of MSGCDetection, added to msgc's default tree by :func:`add_detection_config`."""
from msgc.config import CfgNode as CN
from msgc.utils.errors import InvalidValueError

__all__ = ["add_detection_config", "check_detection_config"]


def add_detection_config(cfg):
    """Add the detection keys to ``cfg`` (a copy from :func:`msgc.config.get_cfg`) in place.

    Core keys keep their meaning: ``MODEL.NUM_CLASSES`` is the number of object classes (no
    background), ``MODEL.MSGC.LOSS_WEIGHT`` weighs the backbone's MAC loss, ``DATASETS.TRAIN``/``TEST``
    name datasets of :data:`msgc_detection.data.DATASET_CATALOG` and ``DATASETS.ROOT`` is the folder
    their relative paths start from.
    """
    _add_model_keys(cfg)
    _add_input_keys(cfg)
    # Drop training images without any usable box (torchvision can train on them, but they only
    # teach background; detectron2 drops them too). Evaluation always keeps every image.
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True
    # At most this many detections per image at test time.
    cfg.TEST.DETECTIONS_PER_IMAGE = 100
    # Multiplier of SOLVER.BASE_LR for the FPN and the detection heads, which start untrained (the
    # backbone's host gets BASE_LR x PRETRAINED_LR_MULT and its gates BASE_LR, as in classification).
    cfg.SOLVER.HEADS_LR_MULT = 1.0
    return cfg


def _add_model_keys(cfg):
    det = cfg.MODEL.DETECTOR = CN()
    # Registered detector (msgc_detection.DETECTOR_REGISTRY): "faster_rcnn" or "retinanet".
    det.NAME = "faster_rcnn"
    # Backbone stages the FPN reads, finest first (their strides must double from one to the next).
    det.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Channels of every FPN level (and of the heads on them).
    det.FPN_CHANNELS = 256
    # Freeze the backbone's first stages: 0 = nothing, 1 = the stem, 2 = stem and res2 (torchvision's
    # detection recipe), up to 5 = the whole backbone. Frozen stages keep their gates as they are.
    det.FREEZE_AT = 2
    # Normalisation layers of the backbone: "FrozenBN" (statistics and affine fixed, for fine-tuning
    # a pretrained backbone with few images per process), "BN" (trained; for training from scratch
    # with several images per process) or "SyncBN" (BN with statistics over all processes).
    det.NORM = "FrozenBN"
    # Normalisation of the gate generators' BatchNorm, which sees one pooled value per image: "" = as
    # NORM, or "FrozenBN". With few images per process a trained BatchNorm makes each image's gates
    # depend on the other images of its batch; "FrozenBN" keeps it fixed (at identity from scratch).
    det.GATE_NORM = ""
    # Anchor sizes in input pixels, one list per FPN level (finest first; Faster R-CNN has one level
    # more than IN_FEATURES from a max-pool, RetinaNet two, P6 and P7).
    det.ANCHOR_SIZES = [[32], [64], [128], [256], [512]]
    # Anchor aspect ratios (height / width), shared by every level.
    det.ANCHOR_ASPECT_RATIOS = [0.5, 1.0, 2.0]

    rpn = cfg.MODEL.RPN = CN()
    # Proposals kept per FPN level before NMS, and in total after NMS, in training and at test.
    rpn.PRE_NMS_TOPK_TRAIN = 2000
    rpn.PRE_NMS_TOPK_TEST = 1000
    rpn.POST_NMS_TOPK_TRAIN = 2000
    rpn.POST_NMS_TOPK_TEST = 1000
    # IoU threshold of the proposals' NMS.
    rpn.NMS_THRESH = 0.7
    # Anchors sampled per image for the RPN losses.
    rpn.BATCH_SIZE_PER_IMAGE = 256

    roi = cfg.MODEL.ROI_HEADS = CN()
    # Proposals sampled per image for the box head's losses, and their fraction of foreground.
    roi.BATCH_SIZE_PER_IMAGE = 512
    roi.POSITIVE_FRACTION = 0.25
    # Width of the box head's two fully connected layers.
    roi.BOX_HEAD_DIM = 1024
    # Test: minimum score of a detection, and the IoU threshold of the per-class NMS.
    roi.SCORE_THRESH_TEST = 0.05
    roi.NMS_THRESH_TEST = 0.5

    ret = cfg.MODEL.RETINANET = CN()
    # Test: minimum score, per-class NMS threshold, and candidates kept per level before NMS.
    ret.SCORE_THRESH_TEST = 0.05
    ret.NMS_THRESH_TEST = 0.5
    ret.TOPK_CANDIDATES_TEST = 1000


def _add_input_keys(cfg):
    # Resizing inside the detector (torchvision's GeneralizedRCNNTransform): the shorter side becomes
    # one of MIN_SIZE_TRAIN (drawn per batch) or MIN_SIZE_TEST, unless the longer side would exceed
    # MAX_SIZE_*. For small images set both to the images' size: they are then not resized. The
    # core's INPUT.PIXEL_MEAN/STD normalise inside the detector and INPUT.RANDOM_FLIP flips in the
    # loader; the classification crop keys (TRAIN_SIZE, TEST_SIZE, ...) are not used.
    cfg.INPUT.MIN_SIZE_TRAIN = [800]
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333


def check_detection_config(cfg, world_size: int = 1):
    """Refuse settings that would fail deep inside torch during training, with the fix in the message."""
    per_process = cfg.SOLVER.IMS_PER_BATCH // max(1, world_size)
    if cfg.MODEL.DETECTOR.NORM in ("BN", "SyncBN") and per_process < 2 and cfg.MODEL.MSGC.GROUPING != "dense":
        raise InvalidValueError(f"MODEL.DETECTOR.NORM '{cfg.MODEL.DETECTOR.NORM}' with {per_process} image per "
                                "process: the gates' BatchNorm sees one value per image and needs at least 2; use "
                                "FrozenBN or more images per process (SOLVER.IMS_PER_BATCH)")
