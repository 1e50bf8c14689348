"""COCO box AP with pycocotools, and the backbone's MACs per image, over all processes."""
import contextlib
import copy
import io
import json
import logging
import math
from collections import OrderedDict

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msgc.utils import comm

__all__ = ["COCOEvaluator", "COCO_METRICS"]

logger = logging.getLogger(__name__)

# COCOeval.stats[0:6], as fractions in [0, 1]
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _valid_box(bbox):
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
            and bbox[2] > 0 and bbox[3] > 0)


def ground_truth(json_file: str, image_ids) -> COCO:
    """The json as a pycocotools COCO restricted to ``image_ids``, without boxes the loader skips.

    Annotations without a valid box (the ones :func:`load_coco_json` skips with a warning) are left out
    so that training and evaluation see the same objects; crowd regions stay (COCOeval ignores
    detections on them). A missing ``area`` is the box's area.
    """
    with open(json_file) as f:
        data = json.load(f)
    keep = set(image_ids)
    anns = []
    for ann in data["annotations"]:
        if ann.get("image_id") in keep and _valid_box(ann.get("bbox")):
            ann = dict(ann, area=ann.get("area", ann["bbox"][2] * ann["bbox"][3]))
            anns.append(ann)
    data = dict(data, images=[im for im in data["images"] if im["id"] in keep], annotations=anns)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCOEvaluator:
    """Box AP (pycocotools' COCOeval) and the backbone's mean MACs per image of a detection dataset.

    ``process(inputs, outputs)`` takes the batches of a test loader (``(images, targets)``, the
    targets carrying ``image_id``) and the model's outputs (:class:`MSGCDetector` in eval mode).
    ``evaluate()`` gathers every process's predictions to the main process, which computes AP,
    AP50, AP75, APs, APm, APl (fractions; one is left out when the set has no object of its size),
    the backbone's mean MACs per image ``macs``, the dense host's ``dense_macs`` and their ratio
    ``mac_ratio``; every process returns that dict. With the exact test sampler every image is seen by
    one process only; an image reported twice would still count once.

    Args:
        json_file: the dataset's COCO json.
        category_ids: label -> the json's category id.
    """

    def __init__(self, json_file: str, category_ids, name: str = ""):
        self.json_file, self.category_ids, self.name = json_file, list(category_ids), name
        self.reset()

    @classmethod
    def from_dataset(cls, dataset):
        """The evaluator of a :class:`~msgc_detection.data.DetectionDataset`."""
        return cls(dataset.coco.json_file, dataset.coco.category_ids, getattr(dataset, "name", ""))

    def reset(self):
        self._images = {}  # image_id -> (detections in COCO's result format, macs, dense macs)

    def process(self, inputs, outputs):
        _, targets = inputs
        for target, out in zip(targets, outputs):
            image_id = int(target["image_id"])
            boxes = out["boxes"].detach().cpu().numpy().astype(np.float64)
            dets = [{"image_id": image_id, "category_id": self.category_ids[int(label)],
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(score)}
                    for b, label, score in zip(boxes, out["labels"].tolist(), out["scores"].tolist())]
            self._images[image_id] = (dets, float(out["macs"]), float(out["dense_macs"]))

    def evaluate(self):
        images = {}
        for part in comm.all_gather(self._images):
            images.update(part)
        results = self._summarise(images) if comm.is_main_process() else None
        return comm.all_gather(results)[0]  # the main process's results, on every process

    def _summarise(self, images):
        if not images:
            raise RuntimeError(f"evaluation of '{self.name}' saw no image; was process() called?")
        results = self._box_ap(images)
        macs = float(np.mean([v[1] for v in images.values()]))
        dense = float(np.mean([v[2] for v in images.values()]))
        results.update(macs=macs, dense_macs=dense, mac_ratio=macs / dense)
        logger.info("evaluation of '%s' on %d images: %s", self.name, len(images),
                    ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        return results

    def _box_ap(self, images):
        gt = ground_truth(self.json_file, images.keys())
        dets = [d for v in images.values() for d in v[0]]
        if not dets:
            logger.warning("evaluation of '%s': the model detected nothing; every AP is 0", self.name)
            return OrderedDict((k, 0.0) for k in COCO_METRICS)
        with contextlib.redirect_stdout(io.StringIO()) as log:
            dt = gt.loadRes(copy.deepcopy(dets))
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = sorted(images)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summary = "\n".join(line for line in log.getvalue().splitlines() if line.startswith(" Average"))
        logger.info("COCOeval of '%s':\n%s", self.name, summary)
        missing = [k for k, s in zip(COCO_METRICS, ev.stats) if s < 0]
        if missing:
            logger.info("'%s' has no object of the size of %s: left out of the results", self.name, ", ".join(missing))
        return OrderedDict((k, float(s)) for k, s in zip(COCO_METRICS, ev.stats) if s >= 0)
