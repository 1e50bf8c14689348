"""What this machine offers: :func:`check_device`, the one place that turns a device name of the command
line or the config into a ``torch.device`` or a one-line error, and :func:`machine_info`, the machine a
measured number came from."""
import platform

import torch

from .errors import InvalidValueError

__all__ = ["check_device", "machine_info"]


def machine_info() -> dict:
    """The CPU (its name, and on x86 Linux its family, model and widest vector extension), the CPU threads
    and the torch version: what a measured result records so that it can be compared with a rerun."""
    info = {"cpu": platform.processor() or platform.machine(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0]}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return info
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["cpu"] = fields.get("model name", info["cpu"])
    if "cpu family" in fields:
        info.update(cpu_family=int(fields["cpu family"]), cpu_model=int(fields.get("model", 0)))
    if flags:
        info["isa"] = next((isa for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2")) if flag in flags), "sse")
    return info


def check_device(device, source: str = "MODEL.DEVICE") -> torch.device:
    """``torch.device(device)``, or an :class:`InvalidValueError` naming ``source`` (the config key or the
    option that gave it): a name torch does not know, CUDA on a machine without it, a GPU index beyond
    the GPUs present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidValueError(f"{source} must be cpu, cuda or cuda:<index>, got '{device}'") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise InvalidValueError(f"{source} is '{device}' but this machine has no CUDA device "
                                f"(torch.cuda.is_available() is False): use {source} cpu")
    found = torch.cuda.device_count()
    if dev.index is not None and dev.index >= found:
        raise InvalidValueError(f"{source} is '{device}' but this machine has {found} GPU(s) (cuda:0 .. "
                                f"cuda:{found - 1})")
    return dev
