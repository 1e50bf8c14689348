"""The dataset registry, its builder, and the training and test loaders built from a config."""
import functools
import logging
import os
import random

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, default_collate

from ..utils import comm
from ..utils.errors import InvalidValueError
from ..utils.imports import import_pairs, imported_modules
from ..utils.preemption import guard_worker, owner_exiting, stop_signals_blocked
from ..utils.registry import Registry
from .decode import check_decode_device
from .samplers import SAMPLE_STREAM, InferenceSampler, TrainingSampler, seed_from
from .transforms import build_transform

__all__ = ["DATASET_REGISTRY", "DEFAULT_SAMPLER_SEED", "SeededSamples", "augment_image", "build_dataset",
           "build_loader", "build_train_loader", "build_test_loader", "check_dataset", "cores_per_process",
           "loader_workers"]

logger = logging.getLogger(__name__)

DATASET_REGISTRY = Registry("DATASET")
DATASET_REGISTRY.__doc__ = """
Registry for datasets, selected by ``DATASETS.TRAIN`` and ``DATASETS.TEST``.

An entry is a callable ``fn(cfg, split, transform) -> torch.utils.data.Dataset`` where ``split`` is
"train" or "test" and ``transform`` (built from cfg.INPUT by :func:`build_dataset`) maps a PIL image or
a ``3 x H x W`` uint8 tensor to a ``3 x H x W`` uint8 tensor, or is None. Items are ``(image, label)``
with ``label`` an int in ``[0, len(dataset.classes))`` and ``image`` the transformed image, or, when
``transform`` is None, the image as read (a PIL image or a uint8 tensor; files are best read with
:func:`msgc.data.read_image`): the training loader builds the train split so and augments each sample
with a generator of its own (:class:`SeededSamples`). Images stay uint8 up to the model's device, where
:class:`msgc.data.Normalizer` normalises them; an entry whose transform gives float images hands them
to the model as they are (taken as normalised).
An entry must not draw random numbers itself (they would differ after a resume). The dataset has an
attribute ``classes`` (class names in label order); :func:`build_dataset` sets ``name``. An entry reads
its own keys from cfg (e.g. ``DATASETS.ROOT``) and raises a one-line error (a
:class:`~msgc.utils.errors.UserError`) naming the path or key when its data is missing. It may have an
attribute ``check(cfg, split)`` that raises the same error cheaply, without reading the data
(:func:`check_dataset`; launchers call it before starting processes). Register your own with
``@DATASET_REGISTRY.register("name")`` in your module and import that module before building.
"""

# Seed of the training order when cfg.SEED is negative. The order must be the same on every process
# (each takes its own shard of it), which a seed drawn from each process's clock would not be.
DEFAULT_SAMPLER_SEED = 0


def build_dataset(cfg, name: str, split: str, transform=True):
    """Build the registered dataset ``name`` for ``split`` ("train"/"test").

    ``transform``: True applies the transform of cfg for the split (to uint8 images); None gives the
    items as read (PIL images or uint8 tensors), which the training loader augments itself (see
    :class:`SeededSamples`); or a transform to apply. Raises an error if the dataset has more classes
    than ``MODEL.NUM_CLASSES``: its labels would fall outside the classifier's outputs, and for an
    ``INPUT.DECODE_DEVICE`` this machine or ``DATALOADER.NUM_WORKERS`` cannot serve.
    """
    check_decode_device(cfg.INPUT.DECODE_DEVICE, cfg.DATALOADER.NUM_WORKERS)
    if transform is True:
        transform = build_transform(cfg, split)
    dataset = DATASET_REGISTRY.get(name)(cfg, split, transform)
    dataset.name = name
    num_classes = len(dataset.classes)
    if num_classes > cfg.MODEL.NUM_CLASSES:
        raise InvalidValueError(f"dataset '{name}' has {num_classes} classes but MODEL.NUM_CLASSES is "
                                f"{cfg.MODEL.NUM_CLASSES}; set MODEL.NUM_CLASSES to at least {num_classes}")
    logger.info("dataset '%s' (%s): %d images, %d classes", name, split, len(dataset), num_classes)
    return dataset


def check_dataset(cfg, name: str, split: str):
    """Check cheaply, without reading the data, that dataset ``name`` can be built for ``split``.

    Raises the error that building would raise for an unknown name, a missing folder (the entry's
    optional ``check(cfg, split)``) or an ``INPUT.DECODE_DEVICE`` that cannot be served; launchers call
    it before starting processes.
    """
    check_decode_device(cfg.INPUT.DECODE_DEVICE, cfg.DATALOADER.NUM_WORKERS)
    check = getattr(DATASET_REGISTRY.get(name), "check", None)
    if check is not None:
        check(cfg, split)


class SeededSamples(Dataset):
    """A dataset's items augmented with a random generator of their own: the training loader's dataset.

    It is indexed by the ``(position, index)`` pairs of a :class:`TrainingSampler` built with
    ``with_positions=True``: item ``index`` of ``dataset``, augmented by ``augment(item, generator)``
    with a ``torch.Generator`` seeded from ``(seed, position)``. A sample's augmentation is then a
    function of its place in the training stream alone, not of the process, the DataLoader worker or
    the random state that prepares it: a resumed run, or one with another ``DATALOADER.NUM_WORKERS``,
    augments every sample as the uninterrupted run does.

    Args:
        dataset: items as read (no random transform of their own).
        augment: ``(item, generator) -> item``; :func:`augment_image` makes one from an image transform.
        seed: the run's seed (the same on every process).
    """

    def __init__(self, dataset, augment, seed: int):
        self.dataset, self.augment, self.seed = dataset, augment, int(seed)

    def __len__(self):
        return len(self.dataset)

    def generator(self, position: int) -> torch.Generator:
        """The generator of the sample at ``position`` of the training stream."""
        return torch.Generator().manual_seed(seed_from(self.seed, SAMPLE_STREAM, position))

    def __getitem__(self, key):
        position, index = key
        return self.augment(self.dataset[index], self.generator(position))


def augment_image(transform):
    """``(item, generator) -> item`` for ``(image, label)`` items: ``(transform(image, generator), label)``."""
    return functools.partial(_augment_image, transform)


def _augment_image(transform, item, generator):
    image, label = item
    return transform(image, generator), label


def build_train_loader(cfg, *, start_iter: int = 0, rank=None, world_size=None) -> DataLoader:
    """An endless loader of ``(images N x 3 x H x W uint8, labels N long)`` batches of ``DATASETS.TRAIN``.

    ``N = SOLVER.IMS_PER_BATCH // world_size``: each process loads its share of the global batch from
    its shard of a :class:`TrainingSampler` seeded with ``cfg.SEED`` (or :data:`DEFAULT_SAMPLER_SEED`
    when negative), starting with the batch of iteration ``start_iter``: the skipped batches are
    skipped by the sampler, none of their images is read. Every sample is augmented with a generator
    seeded from its position in the stream (:class:`SeededSamples`), so the batches of an iteration
    are the same whatever ``start_iter`` and ``DATALOADER.NUM_WORKERS``. The loader has no length;
    iterate it and stop after the wanted number of iterations. The images are uint8 (normalise them on
    the model's device with :func:`msgc.data.build_normalizer`), in pinned memory when the model is on
    CUDA. ``rank`` and ``world_size`` default to :mod:`msgc.utils.comm`'s (give them to simulate a
    process).
    """
    rank = comm.get_rank() if rank is None else rank
    world_size = comm.get_world_size() if world_size is None else world_size
    batch = _local_train_batch(cfg.SOLVER.IMS_PER_BATCH, world_size)
    dataset = build_dataset(cfg, cfg.DATASETS.TRAIN, "train", transform=None)
    seed = cfg.SEED if cfg.SEED >= 0 else DEFAULT_SAMPLER_SEED
    samples = SeededSamples(dataset, augment_image(build_transform(cfg, "train")), seed)
    samples.classes, samples.name = dataset.classes, dataset.name
    sampler = TrainingSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size,
                              start=start_iter * batch, with_positions=True)
    return build_loader(samples, BatchSampler(sampler, batch, drop_last=True), cfg.DATALOADER.NUM_WORKERS,
                        _collate, pin_memory=_pin(cfg), generator=torch.Generator().manual_seed(seed + rank))


def build_test_loader(cfg, name=None, *, rank=None, world_size=None) -> DataLoader:
    """A loader over this process's exact shard of the test split of ``name`` (default DATASETS.TEST).

    Batches of uint8 images hold ``max(1, TEST.IMS_PER_BATCH // world_size)`` images; the last one may
    be smaller. Over all processes every test image is loaded exactly once (see
    :class:`InferenceSampler`). Its workers are persistent: iterating the loader again reuses them.

    Args:
        cfg: the config: ``DATASETS.ROOT``, ``INPUT.*`` (resize, crop), ``TEST.IMS_PER_BATCH`` and
            ``DATALOADER.NUM_WORKERS`` are read.
        name: a registered dataset (``DATASET_REGISTRY``), e.g. ``"digits"`` or ``"fashion_mnist_val"``.
        rank, world_size: the shard to load (default: this process's, from :mod:`msgc.utils.comm`);
            ``rank=0, world_size=1`` loads the whole split in any process.

    Returns:
        a DataLoader of ``(images, labels)``: uint8 ``N x 3 x H x W`` images (normalise them with
        :func:`build_normalizer`, as the trainer does) and int64 labels.
    """
    world_size = comm.get_world_size() if world_size is None else world_size
    dataset = build_dataset(cfg, name or cfg.DATASETS.TEST, "test")
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    batch = max(1, cfg.TEST.IMS_PER_BATCH // world_size)
    return build_loader(dataset, BatchSampler(sampler, batch, drop_last=False), cfg.DATALOADER.NUM_WORKERS,
                        _collate, pin_memory=_pin(cfg), persistent_workers=True)


def _local_train_batch(global_batch: int, world_size: int) -> int:
    if global_batch <= 0 or global_batch % world_size:
        raise InvalidValueError(f"SOLVER.IMS_PER_BATCH={global_batch} is not divisible by the world size "
                                f"{world_size}; use a positive multiple of {world_size}")
    return global_batch // world_size


def _pin(cfg) -> bool:
    """Pin batches for the copy to a CUDA model (unless they are decoded on the GPU already)."""
    return (torch.cuda.is_available() and str(cfg.MODEL.DEVICE).startswith("cuda")
            and cfg.INPUT.DECODE_DEVICE == "cpu")


def cores_per_process() -> int:
    """The CPU cores this process may run on, shared by the processes of this machine (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // comm.get_local_size())


def loader_workers(asked: int) -> int:
    """``asked`` DataLoader workers, at most :func:`cores_per_process` (with a warning when fewer).

    More decoding processes than cores only take turns on them, each with its own copy of the
    dataset's file list and prefetched batches.
    """
    cores = cores_per_process()
    if asked > cores:
        _warn_once(f"DATALOADER.NUM_WORKERS={asked} is more than the {cores} CPU core(s) of this process "
                   f"({comm.get_local_size()} process(es) on this machine): using {cores} worker(s)")
        return cores
    return asked


@functools.lru_cache(maxsize=None)
def _warn_once(message: str):
    logger.warning(message)


def build_loader(dataset, batch_sampler, num_workers: int, collate_fn, pin_memory: bool = False,
                 generator=None, persistent_workers: bool = False) -> DataLoader:
    """A DataLoader whose workers survive a scheduler's stop signal (see :mod:`msgc.utils.preemption`).

    ``num_workers`` is capped at the cores of this process (:func:`loader_workers`). Its workers seed
    Python's and NumPy's generators from their torch seed (which DataLoader draws from ``generator``),
    and ignore SIGTERM and SIGUSR1 until this process exits: the signal is the training process's to
    handle, and it needs the batch in flight. ``persistent_workers`` (when there are workers) keeps
    them between iterations of the loader: test loaders use it; an endless training loader, iterated
    once, does not, so that its workers end with the trainer's iterator.
    """
    num_workers = loader_workers(num_workers)
    init = functools.partial(_init_worker, owner_exiting() if num_workers > 0 else None, os.getpid(),
                             imported_modules())
    return _GuardedLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate_fn,
                          worker_init_fn=init, pin_memory=pin_memory, generator=generator,
                          persistent_workers=persistent_workers and num_workers > 0)


class _GuardedLoader(DataLoader):
    """Starts its worker processes with the stop signals blocked; each unblocks them once guarded."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_blocked():
            return super().__iter__()


def _collate(items):
    """``(images N x 3 x H x W, labels N)``; in a worker, the images are stacked straight into shared
    memory (``default_collate`` does that), which saves a copy on the way to the training process."""
    images, labels = zip(*items)
    return default_collate(list(images)), torch.tensor(labels, dtype=torch.long)


def _init_worker(exiting, owner: int, imports, worker_id):
    """Seed Python's and NumPy's RNGs from the worker's torch seed (which DataLoader derives from the
    loader's generator), ignore the stop signals until the owner exits, and import the owner's user
    modules. A worker whose owner died while it started leaves at once (DataLoader's own watchdog would
    take the orphan's new parent for its owner)."""
    if os.getppid() != owner:
        os._exit(0)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    if exiting is not None:
        guard_worker(exiting)
    import_pairs(imports)  # guarded first: a worker whose import fails must still end when its owner ends it
