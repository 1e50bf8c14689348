"""Image files as ``3 x H x W`` uint8 RGB tensors: torchvision.io's decoders, PIL for what they refuse.

:func:`read_image` is the one place where the data pipeline decodes a file:

- JPEG, PNG, GIF and WebP files are decoded by ``torchvision.io.decode_image`` (libjpeg-turbo, libpng,
  ...), in RGB mode: grayscale and palette images become three channels, an alpha channel is dropped
  (as PIL's ``convert("RGB")`` does), an animated GIF gives its first frame. EXIF orientation is not
  applied, as before with PIL.
- What torchvision.io refuses (BMP, TIFF and other formats it does not know, CMYK JPEGs where its
  libjpeg build cannot convert them, a damaged file) is opened by PIL and converted to the same kind
  of tensor (:func:`pil_to_uint8`). The choice is made by trying, file by file.
- 16-bit images (PNG) become 8-bit by keeping the high byte, ``v >> 8 = floor(v / 256)``: 65535 -> 255,
  32768 -> 128, 255 -> 0. It is what torchvision's ``to_dtype(..., scale=True)`` does and what PIL does
  for 16-bit RGB; it differs from ``round(v * 255 / 65535)`` by at most 1. (PIL's own ``convert("RGB")``
  of a 16-bit grayscale image clips at 255 instead: the PIL path here shifts too.)
- A file that neither can read (not an image, truncated) raises :class:`CorruptImageError`, one line
  naming the file; a truncated JPEG, which libjpeg would decode with a grey bottom and only a warning,
  is recognised by its missing end-of-image marker and handed to PIL, which refuses it.

With ``device="cuda"``, JPEGs are decoded by nvjpeg on the GPU (``decode_jpeg(..., device=...)``) and
the other formats on the CPU, then moved there. This path has not been run on a GPU by this project.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec; they are called from this
module alone, so that swapping them is a change here.
"""
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from ..utils.errors import InvalidValueError, UserError

__all__ = ["CorruptImageError", "DECODE_DEVICES", "check_decode_device", "decode_bytes", "load_rgb",
           "pil_to_uint8", "read_image"]

# torchvision 0.29 warns at every call that its decoders are deprecated (see the module docstring).
warnings.filterwarnings("ignore", message=r".*image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

#: values of INPUT.DECODE_DEVICE
DECODE_DEVICES = ("cpu", "cuda")

_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"


class CorruptImageError(UserError, OSError):
    """An image file that cannot be read or decoded."""


def read_image(path: str, device: str = "cpu") -> torch.Tensor:
    """The image file ``path`` as a ``3 x H x W`` uint8 RGB tensor on ``device`` (see the module docstring).

    Raises :class:`CorruptImageError` naming the file when it cannot be read or decoded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptImageError(f"cannot read image '{path}': {e.strerror or e}") from None
    return decode_bytes(data, path, device)


def decode_bytes(data: bytes, path: str, device: str = "cpu") -> torch.Tensor:
    """Decode the bytes of an image file (``path`` names it in errors and is opened by the PIL fallback)."""
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
    image = None
    if encoded is not None and _complete(data):
        try:
            if str(device).startswith("cuda") and data.startswith(_JPEG_START):
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            image = decode_image(encoded, mode=ImageReadMode.RGB)
        except RuntimeError:  # a format, colour space or damage that torchvision.io does not handle
            image = None
    if image is None:
        image = pil_to_uint8(load_rgb(path))
    return _to_8_bit(image[0] if image.dim() == 4 else image).to(device)


def _complete(data: bytes) -> bool:
    """False for a JPEG without its end-of-image marker (a truncated file: libjpeg would pad it)."""
    return not data.startswith(_JPEG_START) or data.rstrip(b"\x00\r\n ").endswith(_JPEG_END)


def _to_8_bit(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image
    return F.to_dtype(image, torch.uint8, scale=True)  # uint16: v >> 8


def load_rgb(path: str) -> Image.Image:
    """``path`` opened by PIL as an 8-bit RGB image (16-bit modes shifted as in :func:`read_image`).

    The fallback of :func:`read_image`, and the reference it is tested against. Raises
    :class:`CorruptImageError` naming the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                # high byte of 16-bit grey, as torchvision.io does (PIL's convert would clip at 255)
                grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
                return Image.fromarray(grey, "L").convert("RGB")
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for damaged or unknown files
        raise CorruptImageError(f"cannot read image '{path}': {e}") from None


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ``3 x H x W`` uint8 RGB tensor."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return F.pil_to_tensor(image)


def check_decode_device(device: str, num_workers: int):
    """Raise a one-line error unless INPUT.DECODE_DEVICE ``device`` can be used with ``num_workers``."""
    if device not in DECODE_DEVICES:
        raise InvalidValueError(f"INPUT.DECODE_DEVICE must be one of {', '.join(DECODE_DEVICES)}, got '{device}'")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise InvalidValueError("INPUT.DECODE_DEVICE cuda decodes JPEGs on the GPU, but this machine has no CUDA "
                                "device (torch.cuda.is_available() is False): set INPUT.DECODE_DEVICE cpu")
    if num_workers > 0:
        raise InvalidValueError(f"INPUT.DECODE_DEVICE cuda decodes in the training process (DataLoader worker "
                                f"processes cannot use CUDA), but DATALOADER.NUM_WORKERS is {num_workers}: set "
                                "DATALOADER.NUM_WORKERS 0, or INPUT.DECODE_DEVICE cpu")
