"""MSGCDetection: MSGC backbones transferred to object detection (torchvision's Faster R-CNN and RetinaNet).

Importing the package registers its detectors (``DETECTOR_REGISTRY``) and datasets (``DATASET_CATALOG``).
"""
from .checkpoint import DetectionCheckpointer, map_classification_state_dict
from .config import add_detection_config
from .data import (DATASET_CATALOG, build_detection_dataset, build_detection_test_loader,
                   build_detection_train_loader, generate_toy_shapes, register_coco_instances)
from .evaluation import COCOEvaluator
from .modeling import DETECTOR_REGISTRY, MSGCDetector, MSGCFPN, build_detector

__all__ = ["COCOEvaluator", "DATASET_CATALOG", "DETECTOR_REGISTRY", "DetectionCheckpointer", "MSGCDetector",
           "MSGCFPN", "add_detection_config", "build_detection_dataset", "build_detection_test_loader",
           "build_detection_train_loader", "build_detector", "generate_toy_shapes",
           "map_classification_state_dict", "register_coco_instances"]
