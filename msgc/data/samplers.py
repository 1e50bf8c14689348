"""Samplers that split indices across processes: an endless shuffled one for training and an exact one
for inference; and :func:`skip_batches`, which resumes a loader part-way.

Both take ``rank`` and ``world_size`` from :mod:`msgc.utils.comm` unless given, so tests can simulate
any number of processes in one.
"""
import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..utils import comm
from ..utils.errors import InvalidValueError

__all__ = ["TrainingSampler", "InferenceSampler", "seed_from", "skip_batches"]


def _rank_and_world(rank, world_size):
    world_size = comm.get_world_size() if world_size is None else world_size
    rank = comm.get_rank() if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} processes")
    return rank, world_size


class TrainingSampler(Sampler):
    """An endless stream of indices in ``[0, size)``, sharded across processes.

    The global stream is a sequence of epochs, each a permutation of ``[0, size)`` drawn from a
    generator seeded with ``(seed, epoch)``; process ``rank`` takes its positions ``rank, rank +
    world_size, rank + 2 world_size, ...``. So within an epoch the processes see disjoint indices
    whose union is the whole dataset, every process sees as many samples, and no communication is
    needed. Iteration ``i`` of a run with local batch ``b`` covers global positions ``[i b world_size,
    (i + 1) b world_size)`` whatever the number of processes. The stream never ends and the sampler
    has no length: the training loop decides when to stop.

    Args:
        size: number of samples in the dataset.
        shuffle: draw a fresh permutation per epoch; if False, every epoch is ``0, 1, ..., size - 1``.
        seed: seed of the permutations; it MUST be the same on every process.
        rank, world_size: this process's shard; default from :mod:`msgc.utils.comm`.
        start: the number of this process's samples to skip, e.g. ``start_iter x local batch`` when
            resuming; skipping costs one permutation, whatever ``start`` is.
        with_positions: yield ``(position, index)`` pairs, ``position`` being the sample's place in the
            global stream (what :class:`msgc.data.SeededSamples` seeds a sample's augmentation with).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank=None, world_size=None,
                 start: int = 0, with_positions: bool = False):
        if size <= 0:
            raise InvalidValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size, self.shuffle, self.seed = size, shuffle, int(seed)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.start, self.with_positions = int(start), with_positions

    def epoch(self, number: int) -> list:
        """The order of epoch ``number`` (the same on every process)."""
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(seed_from(self.seed, EPOCH_STREAM, number))
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        position = self.start * self.world_size + self.rank
        number, order = position // self.size, None
        while True:
            if position // self.size != number or order is None:
                number = position // self.size
                order = self.epoch(number)
            index = order[position % self.size]
            yield (position, index) if self.with_positions else index
            position += self.world_size


# Tags that keep the random streams derived from one seed apart (see seed_from).
EPOCH_STREAM, SAMPLE_STREAM = 1, 2


def seed_from(*values: int) -> int:
    """A 63-bit seed mixed from integers by numpy's SeedSequence: the same on every machine, and
    unrelated seeds for nearby inputs (``seed_from(s, SAMPLE_STREAM, p)`` seeds sample ``p``)."""
    return int(np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(1, np.uint64)[0] >> 1)


class InferenceSampler(Sampler):
    """The contiguous slice of ``[0, size)`` that belongs to this process, with no padding.

    Slices of consecutive ranks are adjacent and their sizes differ by at most one, so over all
    processes every index is produced exactly once and no sample is counted twice by an evaluator.

    Args:
        size: number of samples in the dataset.
        rank, world_size: this process's shard; default from :mod:`msgc.utils.comm`.
    """

    def __init__(self, size: int, rank=None, world_size=None):
        self.size = size
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        base, extra = divmod(size, self.world_size)
        self.begin = self.rank * base + min(self.rank, extra)
        self.end = self.begin + base + (self.rank < extra)

    def __iter__(self):
        return iter(range(self.begin, self.end))

    def __len__(self):
        return self.end - self.begin


class _SkippingBatchSampler(Sampler):
    """Yields the batches of ``batch_sampler`` after the first ``skip``."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)


def skip_batches(loader: DataLoader, num_batches: int) -> DataLoader:
    """The same loader, starting after its first ``num_batches`` batches.

    Only the batch sampler's indices are skipped: no image is read for the skipped batches, so
    resuming late in a long run costs only the iteration over the skipped indices. The augmentations
    of the resumed batches are those of the uninterrupted run only if they do not depend on a worker's
    random state (msgc's own training loader seeds each sample instead, see
    :class:`msgc.data.SeededSamples`).
    """
    if num_batches <= 0:
        return loader
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        raise TypeError("skip_batches needs a DataLoader built with a batch sampler; override "
                        "build_train_loader(cfg, start_iter) to resume another kind of loader")
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(loader.dataset, batch_sampler=_SkippingBatchSampler(loader.batch_sampler, num_batches),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      persistent_workers=loader.persistent_workers,
                      multiprocessing_context=loader.multiprocessing_context, **extra)
