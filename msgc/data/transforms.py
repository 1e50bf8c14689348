"""Image transforms of the data pipeline: crop, resize and flip, from uint8 images to uint8 images.

They take the ``3 x H x W`` uint8 tensors that :func:`msgc.data.read_image` decodes (image folders,
digits, synthetic data) and resize them with torchvision's uint8 kernels (antialiased bilinear), or
PIL images (CIFAR), which PIL resizes as the reference training script does; both end as ``3 x H x W``
uint8 tensors. Conversion to float and normalisation happen later, on the model's device, in one place:
:class:`msgc.data.Normalizer`.

The training transform draws its random numbers from a ``torch.Generator`` passed with each image
(``transform(image, generator)``), never from a global random state: the training loader gives every
sample a generator seeded from its position in the training stream (see
:class:`msgc.data.SeededSamples`), so a sample's crop and flip do not depend on which process or
DataLoader worker prepares it, nor on whether the run was resumed.
"""
import math

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from .decode import pil_to_uint8

__all__ = ["TestTransform", "TrainTransform", "random_resized_crop_box", "train_transform", "test_transform",
           "build_transform", "to_uint8"]

# RandomResizedCrop's aspect-ratio range (torchvision's default, as in the reference).
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def to_uint8(image) -> torch.Tensor:
    """A PIL image or a ``3 x H x W`` uint8 tensor as a ``3 x H x W`` uint8 tensor."""
    return pil_to_uint8(image) if isinstance(image, Image.Image) else image


def _uniform(low: float, high: float, generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def random_resized_crop_box(height: int, width: int, scale, ratio=_RATIO, generator=None):
    """``(top, left, h, w)`` of a random crop of an ``height x width`` image, the Inception recipe.

    The crop covers a fraction of the area drawn uniformly from ``scale`` and has an aspect ratio
    (width / height) drawn log-uniformly from ``ratio``; after 10 draws that do not fit, it is the
    largest central crop whose ratio lies in ``ratio``. Every draw comes from ``generator``.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_low, log_high, generator))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Random-resized crop of side ``size`` and optional horizontal flip, to a uint8 tensor.

    ``transform(image, generator=None)`` takes a PIL image or a ``3 x H x W`` uint8 tensor (on any
    device) and draws the crop and the flip from ``generator`` (torch's default generator when None):
    the same draws for both kinds of input, so a tensor and a PIL image of the same pixels get the
    same crop and flip, and differ only by the resize kernels' rounding (PIL's and torchvision's
    antialiased bilinear uint8 kernels: at most a few levels, measured in ``tests/test_decode.py``).

    Args:
        size: side of the square crop.
        min_scale: smallest fraction of the image area a crop covers (the largest is 1).
        flip: flip horizontally with probability 1/2.
    """

    def __init__(self, size: int, min_scale: float, flip: bool):
        self.size, self.scale, self.flip = int(size), (float(min_scale), 1.0), bool(flip)

    def __call__(self, image, generator=None):
        height, width = F.get_size(image)
        top, left, h, w = random_resized_crop_box(height, width, self.scale, generator=generator)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            image = F.horizontal_flip(image)
        return to_uint8(image)

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, flip={self.flip})"


class TestTransform:
    """Resize the shorter side to ``resize`` (antialiased bilinear), center-crop ``size``, to a uint8 tensor.

    Takes a PIL image or a ``3 x H x W`` uint8 tensor, as :class:`TrainTransform` does.
    """

    __test__ = False  # not a pytest class

    def __init__(self, resize: int, size: int):
        self.resize, self.size = int(resize), int(size)

    def __call__(self, image):
        image = F.resize(image, [self.resize], antialias=True)
        return to_uint8(F.center_crop(image, [self.size, self.size]))

    def __repr__(self):
        return f"{type(self).__name__}(resize={self.resize}, size={self.size})"


def train_transform(size: int, min_scale: float, flip: bool) -> TrainTransform:
    """The training transform: see :class:`TrainTransform`."""
    return TrainTransform(size, min_scale, flip)


def test_transform(resize: int, size: int) -> TestTransform:
    """The test transform: see :class:`TestTransform`."""
    return TestTransform(resize, size)


def build_transform(cfg, split: str):
    """The transform of ``split`` ("train" or "test") from the INPUT section of cfg."""
    i = cfg.INPUT
    if split == "train":
        return train_transform(i.TRAIN_SIZE, i.MIN_SCALE, i.RANDOM_FLIP)
    if split == "test":
        return test_transform(i.TEST_RESIZE, i.TEST_SIZE)
    raise ValueError(f"unknown split '{split}'; expected 'train' or 'test'")
