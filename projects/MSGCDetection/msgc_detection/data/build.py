"""Datasets and loaders for detection: batches are ``(images, targets)`` lists, as torchvision's detectors take.

Images travel as uint8 tensors, decoded by :func:`msgc.data.read_image`; :data:`to_unit_range` (the
project trainer's preprocess) makes them float in [0, 1] on the model's device, and the detector's own
transform normalises them with ``INPUT.PIXEL_MEAN``/``STD``.
"""
import logging

import torch
from torch.utils.data import BatchSampler, Dataset

from msgc.data import InferenceSampler, Normalizer, SeededSamples, TrainingSampler, build_loader, read_image
from msgc.utils import comm
from msgc.utils.errors import InvalidValueError

from .catalog import resolve_dataset
from .coco import CocoRecords, load_coco_json

__all__ = ["BatchList", "DetectionDataset", "build_detection_dataset", "build_detection_train_loader",
           "build_detection_test_loader", "random_flip", "to_unit_range"]

logger = logging.getLogger(__name__)

#: ``(images, device) -> images``: a batch's uint8 images as float in [0, 1] on the device (each image
#: keeps its size); float images are only moved.
to_unit_range = Normalizer((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class DetectionDataset(Dataset):
    """Items ``(image, target)``: a uint8 3 x H x W RGB tensor and ``boxes``, ``labels``, ``image_id``.

    Args:
        coco: the checked records of a COCO json (see :func:`load_coco_json`).
        flip: whether training should flip images (:func:`random_flip`, applied by the training loader
            with each sample's own generator); the items themselves are never flipped.
    """

    def __init__(self, coco: CocoRecords, flip: bool = False):
        self.coco, self.flip = coco, flip
        self.records = coco.records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        r = self.records[index]
        image = read_image(r["file_name"])  # CorruptImageError naming the file
        if tuple(image.shape[1:]) != (r["height"], r["width"]):
            raise InvalidValueError(f"{r['file_name']} is {image.shape[2]}x{image.shape[1]} but {self.coco.json_file} "
                                    f"says {r['width']}x{r['height']}; its boxes would not fit the image")
        boxes = torch.from_numpy(r["boxes"].copy())
        return image, {"boxes": boxes, "labels": torch.from_numpy(r["labels"].copy()), "image_id": r["image_id"]}


def random_flip(item, generator):
    """Flip ``(image, target)`` horizontally, boxes included, with probability 1/2 drawn from ``generator``."""
    image, target = item
    if float(torch.rand((), generator=generator)) >= 0.5:
        return item
    width, boxes = image.shape[-1], target["boxes"]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
    return image.flip(-1), dict(target, boxes=flipped)


def _no_augmentation(item, generator):
    return item


def _move(obj, device, non_blocking):
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, dict):
        return {k: _move(v, device, non_blocking) for k, v in obj.items()}
    return obj


class BatchList(list):
    """A list of images (or of targets) that moves to a device as a tensor does.

    The core trainer calls ``labels.to(device)`` on what a loader yields (here the targets, dicts), and
    a preprocess such as :data:`to_unit_range` maps lists of images image by image; detection batches are
    lists (images differ in size), so they answer the ``to`` call themselves.
    """

    def to(self, device, non_blocking: bool = False) -> "BatchList":
        return BatchList(_move(x, device, non_blocking) for x in self)


def collate_detection(batch):
    """A list of ``(image, target)`` -> ``(images, targets)`` :class:`BatchList` s (sizes may differ)."""
    return BatchList(b[0] for b in batch), BatchList(b[1] for b in batch)


def build_detection_dataset(cfg, name: str, train: bool) -> DetectionDataset:
    """The catalog dataset ``name`` with the checks and skips of :func:`load_coco_json`."""
    json_file, image_root = resolve_dataset(name, cfg.DATASETS.ROOT)
    coco = load_coco_json(json_file, image_root, cfg.MODEL.NUM_CLASSES,
                          filter_empty=train and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
                          skip_missing=cfg.DATALOADER.SKIP_CORRUPT)
    logger.info("dataset '%s': %d images, %d boxes, %d classes", name, len(coco.records),
                sum(len(r["labels"]) for r in coco.records), len(coco.category_ids))
    dataset = DetectionDataset(coco, flip=train and cfg.INPUT.RANDOM_FLIP)
    dataset.name = name
    return dataset


def _per_process(total: int, what: str) -> int:
    world = comm.get_world_size()
    if total % world:
        raise InvalidValueError(f"{what}={total} is not divisible by the {world} processes")
    return total // world


def build_detection_train_loader(cfg, dataset=None, start_iter: int = 0):
    """An endless loader of ``(images, targets)`` batches of ``DATASETS.TRAIN`` for this process.

    Each process loads ``SOLVER.IMS_PER_BATCH / world size`` images per batch from its shard of one
    shuffled order seeded by ``cfg.SEED`` (0 when negative), the same on every process, starting
    with the batch of iteration ``start_iter`` (skipped images are not read). Flips are drawn from
    each sample's own generator (:class:`msgc.data.SeededSamples`): a resumed run, with any number of
    DataLoader workers, flips the images the uninterrupted run flips.
    """
    if dataset is None:
        dataset = build_detection_dataset(cfg, cfg.DATASETS.TRAIN, train=True)
    batch = _per_process(cfg.SOLVER.IMS_PER_BATCH, "SOLVER.IMS_PER_BATCH")
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    samples = SeededSamples(dataset, random_flip if dataset.flip else _no_augmentation, seed)
    sampler = TrainingSampler(len(dataset), shuffle=True, seed=seed, start=start_iter * batch, with_positions=True)
    return build_loader(samples, BatchSampler(sampler, batch, drop_last=True), cfg.DATALOADER.NUM_WORKERS,
                        collate_detection, generator=torch.Generator().manual_seed(seed + comm.get_rank()))


def build_detection_test_loader(cfg, name: str = None, dataset=None):
    """A loader over this process's exact shard of the dataset ``name`` (default ``DATASETS.TEST``)."""
    if dataset is None:
        dataset = build_detection_dataset(cfg, name or cfg.DATASETS.TEST, train=False)
    batch = max(1, cfg.TEST.IMS_PER_BATCH // comm.get_world_size())
    return build_loader(dataset, BatchSampler(InferenceSampler(len(dataset)), batch, drop_last=False),
                        cfg.DATALOADER.NUM_WORKERS, collate_detection)
