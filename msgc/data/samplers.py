"""Samplers that split indices across processes: an endless shuffled one for training and an exact one
for inference.

Both take ``rank`` and ``world_size`` from :mod:`msgc.utils.comm` unless given, so tests can simulate
any number of processes in one.
"""
import itertools

import torch
from torch.utils.data import Sampler

from ..utils import comm

__all__ = ["TrainingSampler", "InferenceSampler"]


def _rank_and_world(rank, world_size):
    world_size = comm.get_world_size() if world_size is None else world_size
    rank = comm.get_rank() if rank is None else rank
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} processes")
    return rank, world_size


class TrainingSampler(Sampler):
    """An endless stream of indices in ``[0, size)``, sharded across processes.

    Every process draws the same sequence of permutations (one per epoch) from a generator seeded with
    ``seed``, and keeps positions ``rank, rank + world_size, ...`` of each. So within an epoch the
    processes see disjoint indices whose union is the whole dataset, and no communication is needed.
    The stream never ends and the sampler has no length: the training loop decides when to stop.

    Args:
        size: number of samples in the dataset.
        shuffle: draw a fresh permutation per epoch; if False, every epoch is ``0, 1, ..., size - 1``.
        seed: seed of the permutations; it MUST be the same on every process.
        rank, world_size: this process's shard; default from :mod:`msgc.utils.comm`.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank=None, world_size=None):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        self.size, self.shuffle, self.seed = size, shuffle, int(seed)
        self.rank, self.world_size = _rank_and_world(rank, world_size)

    def _epochs(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield torch.randperm(self.size, generator=generator).tolist()
            else:
                yield list(range(self.size))

    def __iter__(self):
        for order in self._epochs():
            yield from itertools.islice(order, self.rank, None, self.world_size)


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
