"""Data: the dataset registry, transforms, distributed samplers and the train/test loaders.

Importing this package registers the built-in datasets (imagenet, imagefolder, cifar10, cifar100,
digits, synthetic).
"""
from . import datasets  # noqa: F401  (registers the built-in datasets)
from .build import (DATASET_REGISTRY, DEFAULT_SAMPLER_SEED, build_dataset, build_test_loader,
                    build_train_loader)
from .datasets import CorruptImageError, digits_split
from .samplers import InferenceSampler, TrainingSampler
from .transforms import build_transform, test_transform, train_transform

__all__ = [
    "DATASET_REGISTRY", "DEFAULT_SAMPLER_SEED", "CorruptImageError", "InferenceSampler", "TrainingSampler",
    "build_dataset", "build_test_loader", "build_train_loader", "build_transform", "digits_split",
    "test_transform", "train_transform",
]
