"""Data: the dataset registry, image decoding, transforms, distributed samplers, the train/test loaders,
and the preprocessing that turns their uint8 batches into the model's normalised input on its device.

Importing this package registers the built-in datasets (imagenet, imagefolder, cifar10, cifar100,
digits, fashion_mnist, fashion_mnist_val, synthetic).
"""
from . import datasets  # noqa: F401  (registers the built-in datasets)
from .build import (DATASET_REGISTRY, DEFAULT_SAMPLER_SEED, SeededSamples, augment_image, build_dataset,
                    build_loader, build_test_loader, build_train_loader, check_dataset, cores_per_process,
                    loader_workers)
from .datasets import digits_split, fashion_mnist_split, stratified_split
from .decode import CorruptImageError, check_decode_device, load_rgb, read_image
from .preprocess import Normalizer, build_normalizer, to_device
from .samplers import InferenceSampler, TrainingSampler, seed_from, skip_batches
from .transforms import TestTransform, TrainTransform, build_transform, test_transform, train_transform

__all__ = [
    "DATASET_REGISTRY", "DEFAULT_SAMPLER_SEED", "CorruptImageError", "InferenceSampler", "Normalizer",
    "SeededSamples", "TestTransform", "TrainTransform", "TrainingSampler", "augment_image", "build_dataset",
    "build_loader", "build_normalizer", "build_test_loader", "build_train_loader", "build_transform",
    "check_dataset", "check_decode_device", "cores_per_process", "digits_split", "fashion_mnist_split", "load_rgb",
    "loader_workers", "read_image", "seed_from", "skip_batches", "stratified_split", "test_transform", "to_device",
    "train_transform",
]
