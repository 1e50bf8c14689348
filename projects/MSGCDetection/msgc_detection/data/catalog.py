"""The catalog of COCO-format detection datasets, registered by name.

A dataset is a COCO ``instances`` json and the folder of its images. Relative paths start from
``DATASETS.ROOT``. An entry may carry a generator that writes the data when it is absent (the toy set).
"""
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from msgc.utils import comm
from msgc.utils.errors import MissingFileError
from msgc.utils.registry import Registry

from .toy_shapes import generate_toy_shapes, toy_paths

__all__ = ["DATASET_CATALOG", "CocoDatasetSpec", "check_detection_dataset", "register_coco_instances",
           "resolve_dataset"]

DATASET_CATALOG = Registry("DETECTION_DATASET")
DATASET_CATALOG.__doc__ = """
Catalog of COCO-format detection datasets, selected by ``DATASETS.TRAIN`` / ``DATASETS.TEST``.

An entry is a :class:`CocoDatasetSpec`; add one with :func:`register_coco_instances`.
"""


@dataclass(frozen=True)
class CocoDatasetSpec:
    """Where a COCO-format dataset lives.

    Attributes:
        json_file: the COCO ``instances`` json (absolute, or relative to ``DATASETS.ROOT``).
        image_root: the folder that ``file_name`` in the json is relative to (same rule).
        generate: optional ``fn(root)`` that writes the data under ``root`` when the json is absent.
        generate_root: ``root`` for ``generate`` (same rule as the paths).
    """

    json_file: str
    image_root: str
    generate: Optional[Callable[[str], object]] = None
    generate_root: str = ""


def register_coco_instances(name: str, json_file: str, image_root: str, generate=None, generate_root=""):
    """Register a COCO-format dataset under ``name`` (relative paths start from ``DATASETS.ROOT``)."""
    DATASET_CATALOG.register(name)(CocoDatasetSpec(json_file, image_root, generate, generate_root))


def resolve_dataset(name: str, root: str) -> Tuple[str, str]:
    """``(json_file, image_root)`` of the dataset ``name``, generating it first if it can and must.

    Generation happens on the first process of every machine while the others wait, so that
    processes never read a half-written set.
    """
    spec = DATASET_CATALOG.get(name)
    json_file, image_root = (os.path.join(root, p) for p in (spec.json_file, spec.image_root))
    if spec.generate is not None:
        if comm.get_local_rank() == 0 and not os.path.exists(json_file):
            spec.generate(os.path.join(root, spec.generate_root))
        comm.synchronize()  # every process, whether or not it saw the set missing
    _check_paths(name, root, json_file, image_root)
    return json_file, image_root


def check_detection_dataset(name: str, root: str):
    """Check cheaply that dataset ``name`` is registered and its files exist (or will be generated)."""
    spec = DATASET_CATALOG.get(name)
    json_file, image_root = (os.path.join(root, p) for p in (spec.json_file, spec.image_root))
    if spec.generate is None or os.path.exists(json_file):
        _check_paths(name, root, json_file, image_root)


def _check_paths(name, root, json_file, image_root):
    if not os.path.isfile(json_file):
        raise MissingFileError(f"dataset '{name}': annotation file {json_file} does not exist "
                               f"(DATASETS.ROOT is '{root}')")
    if not os.path.isdir(image_root):
        raise MissingFileError(f"dataset '{name}': image folder {image_root} does not exist "
                               f"(DATASETS.ROOT is '{root}')")


def _register_builtin():
    for split in ("train", "val"):
        register_coco_instances(f"coco_2017_{split}", f"coco/annotations/instances_{split}2017.json",
                                f"coco/{split}2017")
        json_file, image_root = toy_paths("toy_shapes", split)
        register_coco_instances(f"toy_shapes_{split}", json_file, image_root,
                                generate=generate_toy_shapes, generate_root="toy_shapes")


_register_builtin()
