"""Data: the dataset registry, transforms, distributed samplers and the train/test loaders.

Importing this package registers the built-in datasets (imagenet, imagefolder, cifar10, cifar100,
digits, synthetic).
"""
from . import datasets  # noqa: F401  (registers the built-in datasets)
from .build import (DATASET_REGISTRY, DEFAULT_SAMPLER_SEED, SeededSamples, augment_image, build_dataset,
                    build_loader, build_test_loader, build_train_loader, check_dataset)
from .datasets import CorruptImageError, digits_split
from .samplers import InferenceSampler, TrainingSampler, seed_from
from .transforms import TrainTransform, build_transform, test_transform, train_transform

__all__ = [
    "DATASET_REGISTRY", "DEFAULT_SAMPLER_SEED", "CorruptImageError", "InferenceSampler", "SeededSamples",
    "TrainTransform", "TrainingSampler", "augment_image", "build_dataset", "build_loader", "build_test_loader",
    "build_train_loader", "build_transform", "check_dataset", "digits_split", "seed_from", "test_transform",
    "train_transform",
]
