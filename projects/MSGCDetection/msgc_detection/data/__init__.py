"""Detection data: the dataset catalog, COCO json reading, loaders and the generated toy set."""
from .build import (BatchList, DetectionDataset, build_detection_dataset, build_detection_test_loader,
                    build_detection_train_loader, collate_detection, random_flip, to_unit_range)
from .catalog import (DATASET_CATALOG, CocoDatasetSpec, check_detection_dataset, register_coco_instances,
                      resolve_dataset)
from .coco import CocoRecords, load_coco_json
from .toy_shapes import CATEGORIES as TOY_CATEGORIES, generate_toy_shapes

__all__ = ["BatchList", "DATASET_CATALOG", "CocoDatasetSpec", "CocoRecords", "DetectionDataset",
           "TOY_CATEGORIES", "build_detection_dataset", "build_detection_test_loader",
           "build_detection_train_loader", "check_detection_dataset", "collate_detection", "generate_toy_shapes",
           "load_coco_json", "random_flip", "register_coco_instances", "resolve_dataset", "to_unit_range"]
