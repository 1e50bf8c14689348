"""What this machine offers: :func:`check_device`, the one place that turns a device name of the command
line or the config into a ``torch.device`` or a one-line error, and :func:`machine_info`, the machine a
measured number came from."""
import platform

import torch

from .errors import InvalidValueError

__all__ = ["check_device", "cpu_description", "describe_cpu", "machine_info"]


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


#: the /proc/cpuinfo flags that decide which kernels and precisions a CPU runs
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve")


def cpu_description() -> dict:
    """This CPU as ``/proc/cpuinfo`` describes it: ``vendor``, ``family``, ``model``, ``name`` (model
    name), ``flags`` (those of :data:`_ISA_FLAGS` it has) and ``cores`` (``os.cpu_count()``); on a system
    without ``/proc/cpuinfo``, what :mod:`platform` says."""
    import os

    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"vendor": fields.get("vendor_id", fields.get("CPU implementer", "")),
            "family": fields.get("cpu family", ""), "model": fields.get("model", fields.get("CPU part", "")),
            "name": fields.get("model name", "") or platform.processor() or platform.machine(),
            "flags": [f for f in _ISA_FLAGS if f in flags], "cores": os.cpu_count()}


def describe_cpu(cpu: dict) -> str:
    """One line: ``AMD EPYC (AuthenticAMD family 25 model 17, 2 cores; avx2 fma avx512f avx512_bf16)``."""
    where = " ".join(p for p in (cpu["vendor"], cpu["family"] and f"family {cpu['family']}",
                                 cpu["model"] and f"model {cpu['model']}") if p)
    return f"{cpu['name']} ({where}, {cpu['cores']} cores; {' '.join(cpu['flags']) or 'no listed vector flags'})"


def machine_info() -> dict:
    """What a measured result records so that a rerun can be compared with it: the CPU's name, family,
    model and widest vector extension (from :func:`cpu_description`), the architecture, the CPU threads
    and the torch version."""
    cpu = cpu_description()
    info = {"cpu": cpu["name"], "machine": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0]}
    if str(cpu["family"]).isdigit():
        info.update(cpu_family=int(cpu["family"]), cpu_model=int(cpu["model"]) if str(cpu["model"]).isdigit() else 0)
    if cpu["flags"]:
        info["isa"] = next((isa for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("neon", "asimd"))
                            if flag in cpu["flags"]), "sse")
    return info
