"""What this machine offers: :func:`check_device`, the one place that turns a device name of the command
line or the config into a ``torch.device`` or a one-line error."""
import torch

from .errors import InvalidValueError

__all__ = ["check_device"]


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
