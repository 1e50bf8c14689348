"""Image transforms of the data pipeline, normalisation included (models take normalised tensors).

The geometric steps come first, so PIL images (image folders, CIFAR) are resized by PIL exactly as the
reference training script does, while uint8 tensors (digits, synthetic data) go through the same
steps on tensors. Both end as float ``3 x H x W`` tensors scaled to [0, 1] and normalised.
"""
import torch
from torchvision.transforms import v2

__all__ = ["train_transform", "test_transform", "build_transform"]


def _to_normalised_tensor(mean, std):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def train_transform(size: int, min_scale: float, flip: bool, mean, std) -> v2.Compose:
    """Random-resized crop of side ``size`` (area scale in ``[min_scale, 1]``), optional horizontal
    flip, then conversion and normalisation."""
    steps = [v2.RandomResizedCrop(size, scale=(min_scale, 1.0))]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


def test_transform(resize: int, size: int, mean, std) -> v2.Compose:
    """Resize the shorter side to ``resize``, center-crop ``size``, then convert and normalise."""
    steps = [v2.Resize(resize), v2.CenterCrop(size)]
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


def build_transform(cfg, split: str) -> v2.Compose:
    """The transform of ``split`` ("train" or "test") from the INPUT section of cfg."""
    i = cfg.INPUT
    if split == "train":
        return train_transform(i.TRAIN_SIZE, i.MIN_SCALE, i.RANDOM_FLIP, i.PIXEL_MEAN, i.PIXEL_STD)
    if split == "test":
        return test_transform(i.TEST_RESIZE, i.TEST_SIZE, i.PIXEL_MEAN, i.PIXEL_STD)
    raise ValueError(f"unknown split '{split}'; expected 'train' or 'test'")
