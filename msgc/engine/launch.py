"""Start a function on one or many processes, on one or many machines, or under ``torchrun``.

One process calls the function directly, without a process group. Several get one process per device
(the calling process itself when a machine runs one), a process group (NCCL on GPUs, gloo on the CPU)
and their global rank ``machine_rank x per_machine + local_rank``. Under ``torchrun`` (``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment) the process group is initialised from the
environment and nothing is spawned.

Each spawned process first imports the user modules that the launching process imported
(:func:`msgc.utils.imports.imported_modules`: ``--import`` and ``IMPORTS``), as it inherits none of them.
When ``launch`` spawns the processes of a machine it watches them:

- bad input found in any of them (a :class:`~msgc.utils.errors.UserError`) is reported to the launcher,
  which ends every process and raises it as one line naming the rank (``error: ... (rank 1 of 2;
  ...)``, exit status 2 under :func:`~msgc.utils.errors.exit_on_user_error`); no process is left
  waiting for the one that failed;
- a bug in any of them ends the others and raises its traceback (torch's ProcessRaisedException);
- SIGTERM and SIGUSR1 sent to the launcher are passed on to the processes, which save a checkpoint and
  stop (:class:`~msgc.engine.hooks.PreemptionCheckpointer`); the launcher then raises
  :class:`~msgc.utils.preemption.Preempted` (exit status 143).

Each spawned process leads a process group of its own, shared with its data-loader workers, so that
ending it ends them too; a signal for the whole run goes to the launcher, which passes it on.
"""
import logging
import multiprocessing.connection
from multiprocessing import resource_tracker
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..utils import comm
from ..utils.env import check_device
from ..utils.errors import UserError, debug_enabled, error_line
from ..utils.file_io import write_atomic
from ..utils.imports import import_pairs, imported_modules
from ..utils.preemption import EXIT_STATUS, STOP_SIGNALS, Preempted

__all__ = ["launch", "find_free_port", "launched_world_size", "LaunchError", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


class LaunchError(UserError, RuntimeError):
    """The processes cannot start: missing GPUs, bad machine ranks or addresses, a process group that
    cannot form."""


class _RankError(UserError):
    """Bad input reported by a spawned process; ``line`` is the line it wrote (naming its rank)."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def launched_world_size(num_gpus_per_machine: int, num_machines: int = 1) -> int:
    """The number of processes :func:`launch` will run (torchrun's ``WORLD_SIZE`` under torchrun)."""
    if _under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise LaunchError(f"--num-gpus and --num-machines must be >= 1, got {num_gpus_per_machine} and "
                          f"{num_machines}")
    return num_gpus_per_machine * num_machines


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

    Raises:
        LaunchError: before anything starts, for GPUs this machine lacks or bad machine settings.
    """
    if _under_torchrun():
        return _run_under_torchrun(main_func, args, device, timeout)
    _check_processes(num_gpus_per_machine, num_machines, machine_rank, device)
    world_size = num_gpus_per_machine * num_machines
    if world_size <= 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines != 1:
            raise LaunchError("--dist-url auto works on one machine only; give tcp://<machine 0 address>:<port>")
        dist_url = f"tcp://127.0.0.1:{find_free_port()}"
    worker_args = (main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, device, timeout,
                   imported_modules())
    if num_gpus_per_machine == 1:  # one process on this machine: this one
        return _worker(0, *worker_args, None)
    _spawn(worker_args, num_gpus_per_machine)


def _check_processes(per_machine: int, num_machines: int, machine_rank: int, device: str):
    launched_world_size(per_machine, num_machines)
    if not 0 <= machine_rank < num_machines:
        raise LaunchError(f"--machine-rank must be in [0, {num_machines}), got {machine_rank}")
    if _backend(device) == "nccl":
        found = torch.cuda.device_count()
        if per_machine > 1 and found < per_machine:
            raise LaunchError(f"--num-gpus {per_machine} with MODEL.DEVICE {device} needs {per_machine} GPU(s) but "
                              f"this machine has {found}: lower --num-gpus, or add MODEL.DEVICE cpu to the "
                              "command line to run CPU processes")
        check_device(device)


def _run_under_torchrun(main_func, args, device, timeout):
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if world_size == 1:
        comm.set_local(local_rank, 1)
        return main_func(*args)
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    comm.set_local(local_rank, per_machine)
    _check_processes(per_machine, 1, 0, device)
    _use_device(device, local_rank, per_machine)
    dist.init_process_group(_backend(device), init_method="env://", timeout=timeout)
    return _run_and_leave(main_func, args)


# ------------------------------------------------------------------------------------------------
# The spawned processes of one machine, and the launcher that watches them
# ------------------------------------------------------------------------------------------------
def _worker(local_rank, main_func, world_size, per_machine, machine_rank, dist_url, args, device, timeout,
            imports, reports):
    """Import the user modules, join the process group as global rank ``machine_rank x per_machine +
    local_rank`` and run main.

    ``imports``: the launcher's ``(module, where)`` pairs; ``reports``: the launcher's folder for
    bad-input reports (None when this process is the launcher).
    """
    rank = machine_rank * per_machine + local_rank
    comm.set_local(local_rank, per_machine)
    if reports is not None:
        os.setpgrp()  # a process group of its own, with its data-loader workers: the launcher ends them together
    try:
        import_pairs(imports)
        _use_device(device, local_rank, per_machine)
        try:
            dist.init_process_group(_backend(device), init_method=dist_url, world_size=world_size, rank=rank,
                                    timeout=timeout)
        except Exception as e:
            raise LaunchError(f"process {rank} of {world_size} could not join the process group at {dist_url}: "
                              f"{e}") from e
        comm.synchronize()
        return _run_and_leave(main_func, args)
    except UserError as e:
        if reports is None or debug_enabled():
            raise
        # Report, then wait: the launcher ends every process. Exiting now would fail the others in
        # their next collective operation with tracebacks of their own.
        line = error_line(e, [f"rank {rank} of {world_size}"])
        write_atomic(os.path.join(reports, f"rank{rank:05d}"), lambda f: f.write(line), mode="w")
        while True:
            time.sleep(60)


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
            raise LaunchError(f"local rank {local_rank} needs a GPU but this machine has "
                              f"{torch.cuda.device_count()}: lower --num-gpus")
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))


def _start_quiet_resource_tracker():
    """Start multiprocessing's resource tracker (shared with the spawned processes) without its warning
    about semaphores "leaked" by processes the launcher killed: it frees them, and says so on stderr."""
    flag = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(flag)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(flag)


def _spawn(worker_args, nprocs: int):
    _start_quiet_resource_tracker()
    with tempfile.TemporaryDirectory(prefix="msgc-launch-") as reports:
        context = mp.start_processes(_worker, args=worker_args + (reports,), nprocs=nprocs, join=False,
                                     start_method="spawn")
        stop = _StopForwarder(context.processes)
        stop.install()
        try:
            _watch(context, reports, stop)
        except BaseException:
            _end(context.processes)
            raise
        finally:
            stop.uninstall()


class _StopForwarder:
    """In the launcher: pass SIGTERM and SIGUSR1 on to the processes (a scheduler may signal the
    launcher alone) and remember them."""

    def __init__(self, processes):
        self.processes, self.received, self._previous = processes, [], {}

    def _handle(self, signum, frame):
        self.received.append(signum)
        for p in self.processes:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def install(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def uninstall(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _first_report(reports: str):
    names = sorted(os.listdir(reports), key=lambda n: (os.stat(os.path.join(reports, n)).st_mtime, n))
    names = [n for n in names if n.startswith("rank") and ".tmp." not in n]
    if not names:
        return None
    with open(os.path.join(reports, names[0])) as f:
        return f.read()


def _watch(context, reports: str, stop: _StopForwarder):
    """Wait for the processes; raise what ended them (see the module docstring)."""
    processes = context.processes
    stopped_by = {-s for s in STOP_SIGNALS}
    while True:
        line = _first_report(reports)
        if line:
            _end(processes)
            raise _RankError(line)
        codes = [p.exitcode for p in processes]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0, EXIT_STATUS)]
        if failed:
            _end(processes)
            if stop.received and all(codes[i] in stopped_by for i in failed):
                raise Preempted("stopped by a signal while the processes were starting")
            raise _failure(context, failed[0])
        if all(c is not None for c in codes):
            if EXIT_STATUS in codes:
                raise Preempted("the processes stopped after saving a checkpoint")
            return
        multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.2)


def _end(processes):
    """Kill the processes and their own children (data-loader workers), which share their process group."""
    for p in processes:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p.exitcode is None:
            p.kill()
    for p in processes:
        p.join()


def _failure(context, index: int) -> Exception:
    """The exception of process ``index``, with its traceback (the format of torch's own launcher)."""
    process, error_file = context.processes[index], context.error_files[index]
    if os.access(error_file, os.R_OK):
        with open(error_file, "rb") as f:
            trace = pickle.load(f)
        return mp.ProcessRaisedException(f"\n\n-- Process {index} terminated with the following error:\n{trace}",
                                         index, process.pid)
    code = process.exitcode
    if code < 0:
        name = signal.Signals(-code).name
        return mp.ProcessExitedException(f"process {index} terminated with signal {name}", index, process.pid,
                                         code, name)
    return mp.ProcessExitedException(f"process {index} terminated with exit code {code}", index, process.pid, code)
