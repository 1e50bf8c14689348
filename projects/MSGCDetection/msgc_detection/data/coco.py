"""Reading a COCO ``instances`` json into checked per-image records.

Problems in the json are either errors that name the file and the offending entry, or skips that are
counted and logged once per kind (see :func:`load_coco_json`); nothing malformed reaches torchvision.
"""
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from msgc.utils.errors import InvalidValueError, MissingFileError

__all__ = ["CocoRecords", "load_coco_json"]

logger = logging.getLogger(__name__)


@dataclass
class CocoRecords:
    """The images of a COCO json with their usable boxes, and how labels map to category ids.

    Attributes:
        json_file: the json the records come from (read again by the evaluator).
        records: one dict per image: ``image_id``, ``file_name`` (full path), ``height``, ``width``,
            ``boxes`` (float32 n x 4, x1 y1 x2 y2 in pixels) and ``labels`` (int64 n, 0 .. K-1).
        category_ids: label -> the json's category id (the json's ids in increasing order).
        class_names: label -> category name.
        skipped: kind of skip -> count (also logged).
    """

    json_file: str
    records: List[dict]
    category_ids: List[int]
    class_names: List[str]
    skipped: Dict[str, int] = field(default_factory=dict)


class _Skips:
    """Counts skipped entries by kind and remembers the first example of each, for one log line each."""

    def __init__(self):
        self.counts, self.examples = Counter(), {}

    def add(self, kind, example):
        self.counts[kind] += 1
        self.examples.setdefault(kind, example)

    def log(self, json_file):
        for kind, n in self.counts.items():
            logger.warning("%s: skipped %d %s (first: %s)", json_file, n, kind, self.examples[kind])


def _read_json(json_file):
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidValueError(f"{json_file}: cannot read a COCO json ({e})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise InvalidValueError(f"{json_file}: not a COCO instances json, it has no list '{missing[0]}'")
    return data


def _categories(data, json_file, num_classes):
    cats = sorted(data["categories"], key=lambda c: c["id"])
    if not cats:
        raise InvalidValueError(f"{json_file}: the json declares no categories")
    if len(cats) > num_classes:
        raise InvalidValueError(f"{json_file} declares {len(cats)} categories but MODEL.NUM_CLASSES is {num_classes}; "
                                f"set MODEL.NUM_CLASSES to {len(cats)}")
    return [c["id"] for c in cats], [str(c.get("name", c["id"])) for c in cats]


def _images(data, json_file, image_root, skips, skip_missing):
    images, missing = {}, []
    for im in data["images"]:
        if im.get("id") in images:
            raise InvalidValueError(f"{json_file}: image id {im.get('id')} appears twice")
        if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("height", "width")):
            raise InvalidValueError(f"{json_file}: image id {im.get('id')} has no positive integer height and width")
        path = os.path.join(image_root, im["file_name"])
        if not os.path.isfile(path):
            missing.append(path)
            continue
        images[im["id"]] = {"image_id": im["id"], "file_name": path, "height": im["height"],
                            "width": im["width"], "boxes": [], "labels": []}
    if missing and not skip_missing:
        raise MissingFileError(f"{json_file}: {len(missing)} image files do not exist (first: {missing[0]}); "
                               "set DATALOADER.SKIP_CORRUPT True to skip them")
    for path in missing:
        skips.add("images whose file does not exist", path)
    return images


def _box(ann, image):
    """The annotation's box clipped to the image as (x1, y1, x2, y2), or a reason to skip it."""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        return None, "annotations without a bbox of 4 finite numbers"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return None, "annotations with a box of zero or negative width or height"
    x1, y1 = max(0.0, float(x)), max(0.0, float(y))
    x2, y2 = min(float(image["width"]), float(x + w)), min(float(image["height"]), float(y + h))
    if x2 <= x1 or y2 <= y1:
        return None, "annotations whose box lies outside the image"
    return (x1, y1, x2, y2), None


def load_coco_json(json_file: str, image_root: str, num_classes: int, filter_empty: bool = False,
                   skip_missing: bool = False) -> CocoRecords:
    """Read a COCO instances json into :class:`CocoRecords`.

    Errors (ValueError/FileNotFoundError naming the file and entry): unreadable json; a json
    without ``images``/``annotations``/``categories``; more categories than ``num_classes``; an
    annotation whose ``category_id`` the json does not declare; duplicate image ids; images without
    positive ``height``/``width``; image files that do not exist (unless ``skip_missing``).

    Skipped, counted and logged: annotations with a missing or non-finite bbox, with zero or negative
    width or height, or lying outside the image once clipped; crowd annotations (``iscrowd``: they
    are not objects to detect); annotations of unknown or skipped images; images whose file does not
    exist (with ``skip_missing``); images left without any box (only with ``filter_empty``, for
    training). Boxes partly outside the image are clipped to it.
    """
    data = _read_json(json_file)
    category_ids, class_names = _categories(data, json_file, num_classes)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    skips = _Skips()
    images = _images(data, json_file, image_root, skips, skip_missing)
    for ann in data["annotations"]:
        if ann.get("category_id") not in label_of:
            raise InvalidValueError(f"{json_file}: annotation {ann.get('id')} has category_id "
                                    f"{ann.get('category_id')}, "
                                    f"which the json's categories do not declare ({category_ids})")
        image = images.get(ann.get("image_id"))
        if image is None:
            skips.add("annotations of images that are not loaded", f"annotation {ann.get('id')}")
            continue
        if ann.get("iscrowd", 0):
            skips.add("crowd annotations", f"annotation {ann.get('id')}")
            continue
        box, reason = _box(ann, image)
        if box is None:
            skips.add(reason, f"annotation {ann.get('id')} bbox {ann.get('bbox')}")
            continue
        image["boxes"].append(box)
        image["labels"].append(label_of[ann["category_id"]])
    records = []
    for image in images.values():
        if filter_empty and not image["boxes"]:
            skips.add("images without usable boxes", f"image {image['image_id']}")
            continue
        image["boxes"] = np.asarray(image["boxes"], dtype=np.float32).reshape(-1, 4)
        image["labels"] = np.asarray(image["labels"], dtype=np.int64)
        records.append(image)
    skips.log(json_file)
    if not records:
        raise InvalidValueError(f"{json_file}: no image is left to use (skipped: {dict(skips.counts)})")
    return CocoRecords(json_file, records, category_ids, class_names, dict(skips.counts))
