"""The dataset registry, its builder, and the training and test loaders built from a config."""
import logging
import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader

from ..utils import comm
from ..utils.registry import Registry
from .samplers import InferenceSampler, TrainingSampler
from .transforms import build_transform

__all__ = ["DATASET_REGISTRY", "DEFAULT_SAMPLER_SEED", "build_dataset", "build_train_loader",
           "build_test_loader"]

logger = logging.getLogger(__name__)

DATASET_REGISTRY = Registry("DATASET")
DATASET_REGISTRY.__doc__ = """
Registry for datasets, selected by ``DATASETS.TRAIN`` and ``DATASETS.TEST``.

An entry is a callable ``fn(cfg, split, transform) -> torch.utils.data.Dataset`` where ``split`` is
"train" or "test" and ``transform`` (built from cfg.INPUT by :func:`build_dataset`) maps a PIL image or
a ``3 x H x W`` uint8 tensor to a normalised float tensor. Items are ``(image, label)`` with ``image`` a
float ``3 x H x W`` tensor and ``label`` an int in ``[0, len(dataset.classes))``. The dataset has an
attribute ``classes`` (class names in label order); :func:`build_dataset` sets ``name``. An entry reads
its own keys from cfg (e.g. ``DATASETS.ROOT``) and raises a one-line error naming the path or key when
its data is missing. Register your own with ``@DATASET_REGISTRY.register("name")`` in your module and
import that module before building.
"""

# Seed of the training order when cfg.SEED is negative. The order must be the same on every process
# (each takes its own shard of it), which a seed drawn from each process's clock would not be.
DEFAULT_SAMPLER_SEED = 0


def build_dataset(cfg, name: str, split: str):
    """Build the registered dataset ``name`` for ``split`` ("train"/"test") with the transforms of cfg.

    Raises ValueError if the dataset has more classes than ``MODEL.NUM_CLASSES``: its labels would
    fall outside the classifier's outputs.
    """
    dataset = DATASET_REGISTRY.get(name)(cfg, split, build_transform(cfg, split))
    dataset.name = name
    num_classes = len(dataset.classes)
    if num_classes > cfg.MODEL.NUM_CLASSES:
        raise ValueError(f"dataset '{name}' has {num_classes} classes but MODEL.NUM_CLASSES is "
                         f"{cfg.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES to at least {num_classes}")
    logger.info("dataset '%s' (%s): %d images, %d classes", name, split, len(dataset), num_classes)
    return dataset


def build_train_loader(cfg, *, rank=None, world_size=None) -> DataLoader:
    """An endless loader of ``(images N x 3 x H x W, labels N long)`` batches of ``DATASETS.TRAIN``.

    ``N = SOLVER.IMS_PER_BATCH // world_size``: each process loads its share of the global batch from
    its shard of a :class:`TrainingSampler` seeded with ``cfg.SEED`` (or :data:`DEFAULT_SAMPLER_SEED`
    when negative). Workers get deterministic, per-process distinct seeds; with
    ``DATALOADER.NUM_WORKERS = 0`` augmentations use the global torch RNG, which the caller seeds.
    The loader has no length; iterate it and stop after the wanted number of iterations.
    ``rank`` and ``world_size`` default to :mod:`msgc.utils.comm`'s (give them to simulate a process).
    """
    rank = comm.get_rank() if rank is None else rank
    world_size = comm.get_world_size() if world_size is None else world_size
    batch = _local_train_batch(cfg.SOLVER.IMS_PER_BATCH, world_size)
    dataset = build_dataset(cfg, cfg.DATASETS.TRAIN, "train")
    seed = cfg.SEED if cfg.SEED >= 0 else DEFAULT_SAMPLER_SEED
    sampler = TrainingSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(seed + rank)
    return _loader(cfg, dataset, BatchSampler(sampler, batch, drop_last=True), generator, persistent=True)


def build_test_loader(cfg, name=None, *, rank=None, world_size=None) -> DataLoader:
    """A loader over this process's exact shard of the test split of ``name`` (default DATASETS.TEST).

    Batches hold ``max(1, TEST.IMS_PER_BATCH // world_size)`` images; the last one may be smaller.
    Over all processes every test image is loaded exactly once (see :class:`InferenceSampler`).
    """
    world_size = comm.get_world_size() if world_size is None else world_size
    dataset = build_dataset(cfg, name or cfg.DATASETS.TEST, "test")
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    batch = max(1, cfg.TEST.IMS_PER_BATCH // world_size)
    return _loader(cfg, dataset, BatchSampler(sampler, batch, drop_last=False))


def _local_train_batch(global_batch: int, world_size: int) -> int:
    if global_batch <= 0 or global_batch % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={global_batch} is not divisible by the world size "
                         f"{world_size}; use a positive multiple of {world_size}")
    return global_batch // world_size


def _loader(cfg, dataset, batch_sampler, generator=None, persistent=False) -> DataLoader:
    workers = cfg.DATALOADER.NUM_WORKERS
    pin = torch.cuda.is_available() and str(cfg.MODEL.DEVICE).startswith("cuda")
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=_collate,
                      worker_init_fn=_seed_worker, generator=generator, pin_memory=pin,
                      persistent_workers=persistent and workers > 0)


def _collate(items):
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def _seed_worker(worker_id):
    """Seed Python's and NumPy's RNGs from the worker's torch seed (which DataLoader derives from the
    loader's generator), so that augmentations using any of them are reproducible."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
