"""Start a function on one or many processes, on one or many machines, or under ``torchrun``.

One process calls the function directly, without a process group. Several get one process per device
(the calling process itself when a machine runs one), a process group (NCCL on GPUs, gloo on the CPU)
and their global rank ``machine_rank x per_machine + local_rank``. Under ``torchrun`` (``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment) the process group is initialised from the
environment and nothing is spawned.
"""
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm

__all__ = ["launch", "find_free_port", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args=(), device: str = "cuda", timeout: timedelta = DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` on ``num_gpus_per_machine x num_machines`` processes.

    Args:
        main_func: the function every process runs; picklable (a module-level function) when spawned.
        num_gpus_per_machine: processes on this machine (one per GPU, or CPU processes for device cpu).
        num_machines: machines taking part.
        machine_rank: this machine's index in [0, num_machines).
        dist_url: where the processes meet, e.g. ``tcp://10.0.0.1:29500`` (the address of machine 0);
            "auto" picks a free local port, for one machine only.
        args: arguments of ``main_func``.
        device: "cuda..." uses NCCL with one GPU per process; "cpu" uses gloo.
        timeout: of collective operations.
    """
    if _under_torchrun():
        return _run_under_torchrun(main_func, args, device, timeout)
    world_size = num_gpus_per_machine * num_machines
    if world_size <= 1:
        return main_func(*args)
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"--machine-rank must be in [0, {num_machines}), got {machine_rank}")
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://<machine 0 address>:<port>")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    worker_args = (main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, device, timeout)
    if num_gpus_per_machine == 1:  # one process on this machine: this one
        return _worker(0, *worker_args)
    mp.start_processes(_worker, nprocs=num_gpus_per_machine, start_method="spawn", daemon=False, args=worker_args)


def _run_under_torchrun(main_func, args, device, timeout):
    world_size = int(os.environ["WORLD_SIZE"])
    comm._LOCAL_RANK = int(os.environ["LOCAL_RANK"])
    if world_size == 1:
        return main_func(*args)
    _use_device(device, comm._LOCAL_RANK, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    dist.init_process_group(_backend(device), init_method="env://", timeout=timeout)
    return _run_and_leave(main_func, args)


def _worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, device, timeout):
    """Join the process group as global rank ``machine_rank x per_machine + local_rank`` and run main."""
    rank = machine_rank * per_machine + local_rank
    comm._LOCAL_RANK = local_rank
    _use_device(device, local_rank, per_machine)
    try:
        dist.init_process_group(_backend(device), init_method=dist_url, world_size=world_size, rank=rank,
                                timeout=timeout)
    except Exception as e:
        raise RuntimeError(f"process {rank} of {world_size} could not join the process group at {dist_url}: "
                           f"{e}") from e
    comm.synchronize()
    return _run_and_leave(main_func, args)


def _run_and_leave(main_func, args):
    """Run main, then leave the process group together with the others.

    After an error the group is not destroyed: the other processes may be blocked in a collective
    with this one, and tearing the group down under them can hang; the launcher ends them instead.
    """
    result = main_func(*args)
    comm.synchronize()  # nobody tears down its connections while another still uses them
    dist.destroy_process_group()
    return result


def _use_device(device: str, local_rank: int, per_machine: int):
    """Pin a GPU per process; on the CPU, share this machine's cores among its processes (unless
    OMP_NUM_THREADS says otherwise)."""
    if _backend(device) == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} needs a GPU but this machine has "
                               f"{torch.cuda.device_count()}: lower --num-gpus")
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
