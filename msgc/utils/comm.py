"""Distributed helpers that do nothing (and need no process group) at world size 1."""
import functools

import torch
import torch.distributed as dist

__all__ = ["get_world_size", "get_rank", "get_local_rank", "get_local_size", "set_local", "is_main_process",
           "synchronize", "all_gather", "all_reduce_sum", "any_process"]

# set by msgc.engine.launch (set_local) for the processes of one machine
_LOCAL_RANK = 0
_LOCAL_SIZE = 1


def _on():
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if _on() else 1


def get_rank() -> int:
    return dist.get_rank() if _on() else 0


def get_local_rank() -> int:
    return _LOCAL_RANK


def get_local_size() -> int:
    """The number of processes of this run on this machine."""
    return _LOCAL_SIZE


def set_local(rank: int, size: int):
    """Record this process's rank among the ``size`` processes of this run on its machine (the launcher's
    job, before the process group exists)."""
    global _LOCAL_RANK, _LOCAL_SIZE
    _LOCAL_RANK, _LOCAL_SIZE = rank, size


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize():
    """Barrier across all processes (no-op at world size 1)."""
    if get_world_size() > 1:
        if dist.get_backend() == dist.Backend.NCCL and torch.cuda.is_available():
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@functools.lru_cache()
def _cpu_group():
    """A gloo group for gathering Python objects, whatever the main backend is."""
    return dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD


def all_gather(obj):
    """Gather a picklable object from every process; returns a list indexed by rank."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_cpu_group())
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (returns it unchanged at world size 1)."""
    if get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is True on any process (returns it at world size 1).

    One all-reduce of a one-element CPU tensor over gloo, whatever the main backend: no GPU kernel,
    no device synchronisation, cheap enough to call every iteration.
    """
    if get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_cpu_group())
    return bool(value.item())
