"""Image transforms of the data pipeline, normalisation included (models take normalised tensors).

The geometric steps come first, so PIL images (image folders, CIFAR) are resized by PIL exactly as the
reference training script does, while uint8 tensors (digits, synthetic data) go through the same
steps on tensors. Both end as float ``3 x H x W`` tensors scaled to [0, 1] and normalised.

The training transform draws its random numbers from a ``torch.Generator`` passed with each image
(``transform(image, generator)``), never from a global random state: the training loader gives every
sample a generator seeded from its position in the training stream (see
:class:`msgc.data.SeededSamples`), so a sample's crop and flip do not depend on which process or
DataLoader worker prepares it, nor on whether the run was resumed.
"""
import math

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["TrainTransform", "random_resized_crop_box", "train_transform", "test_transform", "build_transform"]

# RandomResizedCrop's aspect-ratio range (torchvision's default, as in the reference).
_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _to_normalised_tensor(mean, std):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


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
    """Random-resized crop of side ``size``, optional horizontal flip, conversion and normalisation.

    ``transform(image, generator=None)`` takes a PIL image or a ``3 x H x W`` uint8 tensor and draws
    the crop and the flip from ``generator`` (torch's default generator when None).

    Args:
        size: side of the square crop.
        min_scale: smallest fraction of the image area a crop covers (the largest is 1).
        flip: flip horizontally with probability 1/2.
        mean, std: per-channel normalisation, in [0, 1] units.
    """

    def __init__(self, size: int, min_scale: float, flip: bool, mean, std):
        self.size, self.scale, self.flip = int(size), (float(min_scale), 1.0), bool(flip)
        self.finish = v2.Compose(_to_normalised_tensor(mean, std))

    def __call__(self, image, generator=None):
        height, width = F.get_size(image)
        top, left, h, w = random_resized_crop_box(height, width, self.scale, generator=generator)
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            image = F.horizontal_flip(image)
        return self.finish(image)

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, flip={self.flip}, "
                f"finish={self.finish})")


def train_transform(size: int, min_scale: float, flip: bool, mean, std) -> TrainTransform:
    """The training transform: see :class:`TrainTransform`."""
    return TrainTransform(size, min_scale, flip, mean, std)


def test_transform(resize: int, size: int, mean, std) -> v2.Compose:
    """Resize the shorter side to ``resize``, center-crop ``size``, then convert and normalise."""
    steps = [v2.Resize(resize), v2.CenterCrop(size)]
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


def build_transform(cfg, split: str):
    """The transform of ``split`` ("train" or "test") from the INPUT section of cfg."""
    i = cfg.INPUT
    if split == "train":
        return train_transform(i.TRAIN_SIZE, i.MIN_SCALE, i.RANDOM_FLIP, i.PIXEL_MEAN, i.PIXEL_STD)
    if split == "test":
        return test_transform(i.TEST_RESIZE, i.TEST_SIZE, i.PIXEL_MEAN, i.PIXEL_STD)
    raise ValueError(f"unknown split '{split}'; expected 'train' or 'test'")
