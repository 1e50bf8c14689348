"""The built-in datasets: image folders (ImageNet and any other), CIFAR, scikit-learn's digits,
Fashion-MNIST and synthetic data. Each is registered in :data:`DATASET_REGISTRY` and follows its contract.
"""
import functools
import logging
import os
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from ..utils.errors import InvalidValueError, MissingFileError
from .build import DATASET_REGISTRY
from .decode import CorruptImageError, load_rgb, read_image

__all__ = ["CorruptImageError", "ImageFolderDataset", "TensorImageDataset", "SyntheticDataset",
           "load_rgb", "read_image", "digits_split", "fashion_mnist_folder", "fashion_mnist_split",
           "stratified_split"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------
def _subfolders(path: str) -> list:
    if not os.path.isdir(path):
        raise MissingFileError(f"dataset folder '{path}' does not exist")
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


class ImageFolderDataset(tv_datasets.ImageFolder):
    """One split of an image-folder tree (``root/<class>/<image>``) with a given class list.

    The labels come from ``classes`` rather than from the split's own folders, so that a test split
    lacking a class still maps every class name to its training label; a folder not in ``classes`` is
    an error. A class folder with no image is an error too: it usually means a broken copy.

    Images are read by :func:`msgc.data.read_image` as ``3 x H x W`` uint8 RGB tensors (torchvision.io,
    PIL for what it cannot decode). A file that cannot be decoded raises :class:`CorruptImageError`
    naming it. With ``skip_corrupt=True`` it is replaced by the next readable sample (so batches keep
    their size), a warning names it the first time this process meets it, and ``skipped`` holds the
    corrupt paths this process met (each data-loader worker has its own copy and its own warnings).

    Args:
        root: the split's folder.
        classes: class names in label order (normally the sorted class folders of ``train/``).
        transform: applied to each uint8 image.
        skip_corrupt: skip corrupt images instead of raising.
        decode_device: where JPEGs are decoded, "cpu" or "cuda" (see :func:`msgc.data.read_image`).
    """

    def __init__(self, root: str, classes, transform=None, skip_corrupt: bool = False, decode_device: str = "cpu"):
        self._given_classes = list(classes)
        self.skip_corrupt = skip_corrupt
        self.skipped = set()
        loader = read_image if decode_device == "cpu" else functools.partial(read_image, device=decode_device)
        super().__init__(root, transform=transform, loader=loader, allow_empty=True)
        self._check_no_empty_class()

    def find_classes(self, directory):
        unknown = sorted(set(_subfolders(directory)) - set(self._given_classes))
        if unknown:
            raise InvalidValueError(f"class folder '{os.path.join(directory, unknown[0])}' is not one of the "
                                    f"{len(self._given_classes)} classes of the training split")
        return self._given_classes, {name: i for i, name in enumerate(self._given_classes)}

    def _check_no_empty_class(self):
        counts = Counter(self.targets)
        for name in _subfolders(self.root):
            if counts[self.class_to_idx[name]] == 0:
                raise InvalidValueError(f"class folder '{os.path.join(self.root, name)}' has no images "
                                        f"(extensions {', '.join(self.extensions)})")

    def __getitem__(self, index):
        for offset in range(len(self)):
            path, label = self.samples[(index + offset) % len(self)]
            try:
                image = self.loader(path)
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise
                self._note_skipped(path, e)
                continue
            return self.transform(image) if self.transform else image, label
        raise CorruptImageError(f"every image under '{self.root}' is corrupt")

    def _note_skipped(self, path, error):
        if path not in self.skipped:
            self.skipped.add(path)
            logger.warning("DATALOADER.SKIP_CORRUPT: skipping %s; %d corrupt file(s) skipped so far in "
                           "this process", error, len(self.skipped))


def _folders(cfg, split, test_folders):
    """(the split's folder, the folder whose subfolders are the classes), checked to exist.

    The split's folder is ``train/`` of DATASETS.ROOT for "train", else the first of ``test_folders``
    there; the classes are those of ``train/`` when it exists.
    """
    root = cfg.DATASETS.ROOT
    if not os.path.isdir(root):
        raise MissingFileError(f"dataset folder '{root}' (DATASETS.ROOT) does not exist")
    candidates = ["train"] if split == "train" else test_folders
    folders = [os.path.join(root, c) for c in candidates if os.path.isdir(os.path.join(root, c))]
    if not folders:
        raise MissingFileError(f"dataset folder '{os.path.join(root, candidates[0])}' does not exist "
                               f"(DATASETS.ROOT needs {' or '.join(c + '/' for c in candidates)} for "
                               f"the {split} split)")
    train_folder = os.path.join(root, "train")
    return folders[0], train_folder if os.path.isdir(train_folder) else folders[0]


def _folder_dataset(cfg, split, transform, test_folders):
    folder, class_source = _folders(cfg, split, test_folders)
    classes = _subfolders(class_source)
    if not classes:
        raise MissingFileError(f"dataset folder '{class_source}' has no class folders")
    return ImageFolderDataset(folder, classes, transform, skip_corrupt=cfg.DATALOADER.SKIP_CORRUPT,
                              decode_device=cfg.INPUT.DECODE_DEVICE)


@DATASET_REGISTRY.register("imagenet")
def imagenet(cfg, split, transform):
    """ImageNet as image folders: DATASETS.ROOT holds ``train/`` and ``val/`` (the test split)."""
    return _folder_dataset(cfg, split, transform, ["val"])


imagenet.check = lambda cfg, split: _folders(cfg, split, ["val"])


@DATASET_REGISTRY.register("imagefolder")
def imagefolder(cfg, split, transform):
    """Any image-folder tree: DATASETS.ROOT holds ``train/`` and ``val/`` (or ``test/``)."""
    return _folder_dataset(cfg, split, transform, ["val", "test"])


imagefolder.check = lambda cfg, split: _folders(cfg, split, ["val", "test"])


# ---------------------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------------------
def _cifar_folder(cfg, folder):
    path = os.path.join(cfg.DATASETS.ROOT, folder)
    if not os.path.isdir(path):
        raise MissingFileError(f"CIFAR folder '{path}' does not exist; put the extracted python version "
                               f"of the dataset (https://www.cs.toronto.edu/~kriz/cifar.html) under "
                               f"DATASETS.ROOT")
    return path


def _cifar(dataset_class, folder, cfg, split, transform):
    path = _cifar_folder(cfg, folder)
    try:
        return dataset_class(cfg.DATASETS.ROOT, train=split == "train", transform=transform, download=False)
    except RuntimeError as e:
        raise InvalidValueError(f"CIFAR files in '{path}' are incomplete or corrupt: {e}") from e


@DATASET_REGISTRY.register("cifar10")
def cifar10(cfg, split, transform):
    """CIFAR-10 from torchvision's files in DATASETS.ROOT (``cifar-10-batches-py/``); never downloads."""
    return _cifar(tv_datasets.CIFAR10, "cifar-10-batches-py", cfg, split, transform)


cifar10.check = lambda cfg, split: _cifar_folder(cfg, "cifar-10-batches-py")


@DATASET_REGISTRY.register("cifar100")
def cifar100(cfg, split, transform):
    """CIFAR-100 from torchvision's files in DATASETS.ROOT (``cifar-100-python/``); never downloads."""
    return _cifar(tv_datasets.CIFAR100, "cifar-100-python", cfg, split, transform)


cifar100.check = lambda cfg, split: _cifar_folder(cfg, "cifar-100-python")


# ---------------------------------------------------------------------------------------------------
# In-memory datasets: digits and synthetic
# ---------------------------------------------------------------------------------------------------
class TensorImageDataset(Dataset):
    """Images held in memory as a ``N x 3 x H x W`` uint8 tensor, with int labels.

    Args:
        images: uint8 tensor ``N x 3 x H x W``.
        labels: N integer labels.
        classes: class names in label order.
        transform: applied to each ``3 x H x W`` uint8 image.
    """

    def __init__(self, images: torch.Tensor, labels, classes, transform=None):
        self.images, self.labels = images, [int(label) for label in labels]
        self.classes, self.transform = list(classes), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        return self.transform(image) if self.transform else image, self.labels[index]


def stratified_split(labels, held_out, seed: int):
    """Indices ``(kept, held)`` (each sorted) of a split of ``labels`` stratified by class.

    ``held_out``: the fraction (a float in (0, 1)) or the number (an int) of items held out. The split
    is a function of the labels, ``held_out`` and ``seed`` alone: the same on every machine.
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    kept, held = train_test_split(np.arange(len(labels)), test_size=held_out, stratify=labels, random_state=seed)
    return np.sort(kept), np.sort(held)


# The digits split: stratified, this fraction held out for testing, drawn with this fixed seed.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split():
    """Indices ``(train, test)`` (sorted) of the fixed split of scikit-learn's 1797 digits.

    The split is stratified by class with :data:`DIGITS_TEST_FRACTION` held out and seed
    :data:`DIGITS_SPLIT_SEED`: 1437 training and 360 test images, the same on every machine.
    """
    from sklearn.datasets import load_digits

    return stratified_split(load_digits().target, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)


@DATASET_REGISTRY.register("digits")
def digits(cfg, split, transform):
    """The real 8x8 handwritten digits that scikit-learn ships (no download), as 3-channel images.

    Grey levels 0..16 become uint8 0..255, copied to three channels; the transforms of cfg.INPUT then
    upscale them (e.g. INPUT.TRAIN_SIZE = INPUT.TEST_SIZE = INPUT.TEST_RESIZE = 32). Flipping digits
    changes their meaning, so configs for them should set INPUT.RANDOM_FLIP False. The train/test split
    is fixed: see :func:`digits_split`.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    index = digits_split()[0 if split == "train" else 1]
    grey = torch.from_numpy(np.rint(data.images[index] * (255.0 / 16.0)).astype(np.uint8))
    images = grey[:, None].expand(-1, 3, -1, -1).contiguous()
    return TensorImageDataset(images, data.target[index], [str(d) for d in range(10)], transform)


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST: the real 28x28 clothing images, from the IDX files of Debian's dataset-fashion-mnist
# ---------------------------------------------------------------------------------------------------
#: where Debian's package ``dataset-fashion-mnist`` installs the four files
FASHION_MNIST_SYSTEM_FOLDER = "/usr/share/datasets/fashion-mnist"
#: the files of each part (``.gz`` or not), as the dataset's authors name them
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# The validation split: one in this many training images (5000 of the 60000), stratified by class, drawn
# with this seed.
FASHION_MNIST_VAL_EVERY = 12
FASHION_MNIST_SPLIT_SEED = 0


def _fashion_folders(cfg):
    root = cfg.DATASETS.ROOT
    return [root, os.path.join(root, "fashion-mnist"), FASHION_MNIST_SYSTEM_FOLDER]


def _idx_file(folder: str, name: str):
    for candidate in (name, name + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def fashion_mnist_folder(cfg) -> str:
    """The first of DATASETS.ROOT, ``DATASETS.ROOT/fashion-mnist`` and Debian's folder that holds all
    four Fashion-MNIST files (plain or ``.gz``); else a one-line error naming what it looked for."""
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    folders = _fashion_folders(cfg)
    for folder in folders:
        if all(_idx_file(folder, n) for n in names):
            return folder
    partial = [f for f in folders if any(_idx_file(f, n) for n in names)]
    if partial:
        missing = [n for n in names if not _idx_file(partial[0], n)]
        raise MissingFileError(f"Fashion-MNIST folder '{partial[0]}' lacks {', '.join(m + '[.gz]' for m in missing)}")
    raise MissingFileError(
        f"Fashion-MNIST not found: looked for {', '.join(n + '[.gz]' for n in names)} in DATASETS.ROOT "
        f"'{folders[0]}', '{folders[1]}' and '{folders[2]}'; install Debian's package dataset-fashion-mnist "
        f"(apt-get install dataset-fashion-mnist) or set DATASETS.ROOT to a folder with the four files")


@functools.lru_cache(maxsize=4)
def _fashion_part(folder: str, part: str):
    """(grey images N x 28 x 28 uint8 tensor, labels N int64 array) of the "train" or "test" files."""
    from .idx import read_idx

    image_name, label_name = FASHION_MNIST_FILES[part]
    image_path, label_path = _idx_file(folder, image_name), _idx_file(folder, label_name)
    images = read_idx(image_path, (None, 28, 28))
    labels = read_idx(label_path, (None,))
    if len(labels) != len(images):
        raise InvalidValueError(f"'{label_path}' has {len(labels)} labels for the {len(images)} images of "
                                f"'{image_path}'")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise InvalidValueError(f"'{label_path}' holds label {int(labels.max())}; Fashion-MNIST has "
                                f"{len(FASHION_MNIST_CLASSES)} classes")
    return torch.from_numpy(images.copy()), labels.astype(np.int64)


def fashion_mnist_split(labels):
    """Indices ``(train, val)`` (sorted) of the training images: ``len // 12``
    (:data:`FASHION_MNIST_VAL_EVERY`; 5000 of the 60000) held out for validation, stratified by class,
    seed :data:`FASHION_MNIST_SPLIT_SEED`: the same on every machine."""
    return stratified_split(labels, len(labels) // FASHION_MNIST_VAL_EVERY, FASHION_MNIST_SPLIT_SEED)


def _fashion_dataset(cfg, part, index_of, transform):
    grey, labels = _fashion_part(fashion_mnist_folder(cfg), part)
    index = index_of(labels)
    images = grey[torch.from_numpy(index)][:, None].expand(-1, 3, -1, -1)
    return TensorImageDataset(images, labels[index], FASHION_MNIST_CLASSES, transform)


def _all(labels):
    return np.arange(len(labels))


@DATASET_REGISTRY.register("fashion_mnist")
def fashion_mnist(cfg, split, transform):
    """Fashion-MNIST (Zalando's 28x28 grey clothing images, 10 classes) as 3-channel uint8 images.

    The train split is the 60000 training images less the validation split held out from them
    (:func:`fashion_mnist_split`: 55000 remain); the test split is the 10000 test images. The files are
    read from DATASETS.ROOT, ``DATASETS.ROOT/fashion-mnist`` or where Debian's package
    ``dataset-fashion-mnist`` puts them (:data:`FASHION_MNIST_SYSTEM_FOLDER`), plain or gzipped.
    """
    if split == "train":
        return _fashion_dataset(cfg, "train", lambda y: fashion_mnist_split(y)[0], transform)
    return _fashion_dataset(cfg, "test", _all, transform)


@DATASET_REGISTRY.register("fashion_mnist_val")
def fashion_mnist_val(cfg, split, transform):
    """Fashion-MNIST's validation split as the test split: the 5000 training images that
    ``fashion_mnist`` holds out (for model selection and gate calibration). Its train split is
    ``fashion_mnist``'s."""
    if split == "train":
        return fashion_mnist(cfg, split, transform)
    return _fashion_dataset(cfg, "train", lambda y: fashion_mnist_split(y)[1], transform)


fashion_mnist.check = fashion_mnist_val.check = lambda cfg, split: fashion_mnist_folder(cfg)


class SyntheticDataset(Dataset):
    """Random uint8 images with random labels, each a function of ``(seed, index)`` only.

    Meant for smoke tests and benchmarks: nothing to read from disk, any length, and the same items in
    every process and every run.

    Args:
        length: number of items.
        size: side of the square ``3 x size x size`` images.
        num_classes: labels are drawn uniformly from ``[0, num_classes)``.
        seed: seed of the items.
        transform: applied to each uint8 image.
    """

    def __init__(self, length: int, size: int, num_classes: int, seed: int = 0, transform=None):
        if length <= 0:
            raise InvalidValueError(f"synthetic dataset length must be positive, got {length}")
        self.length, self.size, self.seed, self.transform = length, size, seed, transform
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} items")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=generator)
        label = int(torch.randint(0, len(self.classes), (), generator=generator))
        return self.transform(image) if self.transform else image, label


@DATASET_REGISTRY.register("synthetic")
def synthetic(cfg, split, transform):
    """Random images of the configured input size with MODEL.NUM_CLASSES labels (seed 0 for train, 1 for
    test); lengths DATASETS.SYNTHETIC_LENGTH and DATASETS.SYNTHETIC_TEST_LENGTH."""
    if split == "train":
        return SyntheticDataset(cfg.DATASETS.SYNTHETIC_LENGTH, cfg.INPUT.TRAIN_SIZE, cfg.MODEL.NUM_CLASSES,
                                seed=0, transform=transform)
    return SyntheticDataset(cfg.DATASETS.SYNTHETIC_TEST_LENGTH, cfg.INPUT.TEST_SIZE, cfg.MODEL.NUM_CLASSES,
                            seed=1, transform=transform)
