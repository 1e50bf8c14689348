"""Tests of msgc.data: samplers, datasets, transforms, loaders and their errors (CPU, small images)."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from msgc.config import get_cfg
from msgc.data import (DATASET_REGISTRY, CorruptImageError, InferenceSampler, TrainingSampler, build_dataset,
                       build_normalizer, build_test_loader, build_train_loader, digits_split)
from msgc.utils.errors import InvalidValueError
from msgc.utils.registry import UnknownNameError


def small_cfg(dataset="digits", size=32, **overrides):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NUM_CLASSES = 10
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = dataset
    cfg.INPUT.TRAIN_SIZE = cfg.INPUT.TEST_SIZE = cfg.INPUT.TEST_RESIZE = size
    cfg.INPUT.MIN_SCALE = 0.5
    cfg.INPUT.RANDOM_FLIP = False
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 16
    cfg.TEST.IMS_PER_BATCH = 50
    cfg.SEED = 3
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


# ---------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("size", [0, 1, 2, 10, 11, 360])
def test_inference_shards_are_exact_and_contiguous(size, world_size):
    shards = [list(InferenceSampler(size, rank=r, world_size=world_size)) for r in range(world_size)]
    assert sum(shards, []) == list(range(size))  # in order, so contiguous, no duplicate, nothing missing
    for rank, shard in enumerate(shards):
        assert len(InferenceSampler(size, rank=rank, world_size=world_size)) == len(shard)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def take(iterable, n):
    it = iter(iterable)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_training_shards_split_each_epoch_of_one_shared_permutation(world_size):
    size, seed, epochs = 10, 7, 3
    perms = [TrainingSampler(size, seed=seed, rank=0, world_size=1).epoch(e) for e in range(epochs)]
    assert perms[0] != perms[1] and all(sorted(p) == list(range(size)) for p in perms)  # a fresh order per epoch
    stream = sum(perms, [])  # the global stream: the epochs one after the other
    n = len(stream) // world_size
    streams = [take(TrainingSampler(size, seed=seed, rank=r, world_size=world_size), n) for r in range(world_size)]
    for rank, local in enumerate(streams):
        assert local == stream[rank::world_size][:n]  # every rank takes every world_size-th position
    for epoch in range(epochs):
        positions = range(epoch * size, (epoch + 1) * size)
        shards = [{stream[p] for p in positions if p % world_size == r} for r in range(world_size)]
        assert set().union(*shards) == set(range(size)) and sum(map(len, shards)) == size


@pytest.mark.parametrize("world_size", [1, 3])
def test_training_sampler_starts_anywhere_and_tells_positions(world_size):
    full = take(TrainingSampler(7, seed=4, rank=world_size - 1, world_size=world_size, with_positions=True), 40)
    assert [p for p, _ in full] == list(range(world_size - 1, 40 * world_size, world_size))
    late = take(TrainingSampler(7, seed=4, rank=world_size - 1, world_size=world_size, start=23), 17)
    assert late == [i for _, i in full[23:]]  # skipping reads no permutation but the current one


def test_training_sampler_seed_and_no_shuffle():
    a = take(TrainingSampler(50, seed=1, rank=0, world_size=1), 50)
    assert a == take(TrainingSampler(50, seed=1, rank=0, world_size=1), 50)
    assert a != take(TrainingSampler(50, seed=2, rank=0, world_size=1), 50)
    assert sorted(a) == list(range(50))
    # positions 1, 3, 5, 7, 9 of the stream 0 1 2 3 4 | 0 1 2 3 4
    assert take(TrainingSampler(5, shuffle=False, rank=1, world_size=2), 5) == [1, 3, 0, 2, 4]


def test_sampler_rejects_bad_rank_and_empty_dataset():
    with pytest.raises(ValueError, match="rank 2 is outside the world of 2"):
        InferenceSampler(10, rank=2, world_size=2)
    with pytest.raises(InvalidValueError, match="non-empty"):
        TrainingSampler(0, rank=0, world_size=1)


# ---------------------------------------------------------------------------------------------------
# Digits and synthetic
# ---------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_stratified_and_disjoint():
    from sklearn.datasets import load_digits

    train, test = digits_split()
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    again = digits_split()
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    counts = np.bincount(load_digits().target[test], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_items_are_three_channel_uint8_images_normalised_on_the_device():
    from sklearn.datasets import load_digits

    cfg = small_cfg(size=8)  # no resize: the item must equal the grey image exactly
    cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    dataset = build_dataset(cfg, "digits", "test")
    assert dataset.name == "digits" and dataset.classes == [str(d) for d in range(10)] and len(dataset) == 360
    image, label = dataset[5]
    index = digits_split()[1][5]
    grey = torch.tensor(np.rint(load_digits().images[index] * 255 / 16), dtype=torch.uint8)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and torch.equal(image, grey.expand(3, 8, 8))
    assert label == load_digits().target[index]
    mean, std = torch.tensor([0.1, 0.2, 0.3])[:, None, None], torch.tensor([0.5, 0.25, 2.0])[:, None, None]
    normalised = build_normalizer(cfg)(image[None], "cpu")[0]
    assert normalised.dtype == torch.float32 and torch.allclose(normalised, (grey / 255 - mean) / std, atol=1e-6)


def test_digits_train_loader_yields_local_uint8_batches():
    cfg = small_cfg()
    batches = take(build_train_loader(cfg, rank=1, world_size=2), 3)
    for images, labels in batches:
        assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (8,) and labels.dtype == torch.long and 0 <= labels.min() <= labels.max() <= 9
    images = torch.cat([b[0] for b in batches])
    assert images.min() == 0 and images.max() > 200  # the digits' black background and white strokes


def test_train_loader_with_workers_is_reproducible():
    cfg = small_cfg(**{"DATALOADER.NUM_WORKERS": 2})
    first = [take(build_train_loader(cfg, rank=0, world_size=1), 2) for _ in range(2)]
    for (a, la), (b, lb) in zip(*first):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other = take(build_train_loader(cfg, rank=1, world_size=2), 1)[0]
    assert not torch.equal(other[1], first[0][0][1][:8])


def _counting(cfg, split, transform):
    """Synthetic images that count how often they are read (in this process)."""
    from msgc.data.datasets import SyntheticDataset

    class Counting(SyntheticDataset):
        reads = 0

        def __getitem__(self, index):
            Counting.reads += 1
            return super().__getitem__(index)

    _counting.dataset = Counting(30, 12, 10, seed=4, transform=transform)
    return _counting.dataset


def test_train_batches_depend_on_neither_workers_nor_where_the_stream_starts(monkeypatch):
    """Every sample's crop and flip come from its place in the stream: a loader started at iteration 4,
    with 2 workers, gives the batches 4, 5, ... of a loader started at 0 without workers; the skipped
    batches are not read."""
    get = DATASET_REGISTRY.get
    monkeypatch.setattr(DATASET_REGISTRY, "get", lambda name: _counting if name == "counting" else get(name))
    cfg = small_cfg("counting", size=8, **{"INPUT.MIN_SCALE": "0.2", "INPUT.RANDOM_FLIP": "True"})
    full = take(build_train_loader(cfg, rank=1, world_size=2), 6)
    assert _counting.dataset.reads == 6 * 8
    late = take(build_train_loader(cfg, start_iter=4, rank=1, world_size=2), 2)
    assert _counting.dataset.reads == 2 * 8  # a new dataset: nothing read for iterations 0-3
    cfg.DATALOADER.NUM_WORKERS = 2
    workers = take(build_train_loader(cfg, start_iter=4, rank=1, world_size=2), 2)
    for (a, la), (b, lb), (c, lc) in zip(full[4:], late, workers):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(a, c) and torch.equal(la, lc)
    assert not torch.equal(full[0][0], full[1][0])


def test_random_resized_crop_follows_its_generator_and_its_ranges():
    from msgc.data.transforms import random_resized_crop_box

    boxes = [random_resized_crop_box(40, 60, (0.3, 1.0), generator=torch.Generator().manual_seed(s))
             for s in range(200)]
    assert boxes[:3] == [random_resized_crop_box(40, 60, (0.3, 1.0), generator=torch.Generator().manual_seed(s))
                         for s in range(3)]
    assert len(set(boxes)) > 150
    for top, left, h, w in boxes:
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w
        assert 0.3 * 2400 * 0.9 <= h * w <= 2400 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1  # rounding


def test_test_loader_covers_each_image_once_across_ranks():
    cfg = small_cfg()
    loaders = [build_test_loader(cfg, rank=r, world_size=3) for r in range(3)]
    assert [len(loader) for loader in loaders] == [8, 8, 8]  # 120 images per rank in batches of 16
    labels = torch.cat([y for loader in loaders for _, y in loader])
    assert labels.tolist() == loaders[0].dataset.labels


def test_train_batch_must_divide_by_world_size():
    with pytest.raises(ValueError, match=r"SOLVER.IMS_PER_BATCH=10 is not divisible by the world size 3"):
        build_train_loader(small_cfg(**{"SOLVER.IMS_PER_BATCH": 10}), rank=0, world_size=3)


def test_more_classes_than_model_outputs_is_an_error():
    with pytest.raises(ValueError, match="'digits' has 10 classes but MODEL.NUM_CLASSES is 5"):
        build_dataset(small_cfg(**{"MODEL.NUM_CLASSES": 5}), "digits", "train")


def test_synthetic_is_deterministic_and_configured():
    lengths = {"DATASETS.SYNTHETIC_LENGTH": 20, "DATASETS.SYNTHETIC_TEST_LENGTH": 6}
    cfg = small_cfg("synthetic", size=16, **lengths, **{"MODEL.NUM_CLASSES": 3})
    train, test = build_dataset(cfg, "synthetic", "train"), build_dataset(cfg, "synthetic", "test")
    assert (len(train), len(test), train.classes) == (20, 6, ["0", "1", "2"])
    a, b = test[4], build_dataset(cfg, "synthetic", "test")[4]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[0].shape == (3, 16, 16)
    assert not torch.equal(test[4][0], test[5][0])
    assert {train[i][1] for i in range(20)} <= {0, 1, 2}
    images, labels = take(build_train_loader(cfg, rank=0, world_size=1), 1)[0]
    assert images.shape == (16, 3, 16, 16) and labels.max() < 3


def test_unknown_dataset_and_missing_cifar(tmp_path):
    with pytest.raises(UnknownNameError, match="registered: cifar10, cifar100, digits"):
        build_dataset(small_cfg(), "mnist", "train")
    cfg = small_cfg(**{"DATASETS.ROOT": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}/cifar-10-batches-py' does not exist"):
        build_dataset(cfg, "cifar10", "train")
    assert set(DATASET_REGISTRY.names()) >= {"imagenet", "imagefolder", "cifar10", "cifar100", "digits",
                                             "synthetic"}


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------
def write_png(path, seed, size=(16, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_tree(root, splits=("train", "val"), classes=("ant", "bee", "cat"), per_class=2):
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / name / f"{i}.png", seed=100 * c + i)
    return root


def folder_cfg(root, **overrides):
    return small_cfg("imagefolder", size=8, **{"DATASETS.ROOT": str(root), **overrides})


def test_imagefolder_reads_the_tree(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "val" / "bee" / "0.png").unlink()
    (tmp_path / "val" / "bee" / "1.png").unlink()
    (tmp_path / "val" / "bee").rmdir()  # the test split lacks a class: labels must still match train/
    cfg = folder_cfg(tmp_path)
    train = build_dataset(cfg, "imagefolder", "train")
    assert (train.classes, len(train), train.name) == (["ant", "bee", "cat"], 6, "imagefolder")
    image, label = train[2]
    assert image.shape == (3, 8, 8) and label == 1
    test = build_dataset(cfg, "imagefolder", "test")
    assert test.classes == ["ant", "bee", "cat"] and [label for _, label in test.samples] == [0, 0, 2, 2]
    images, labels = next(iter(build_test_loader(cfg, rank=0, world_size=1)))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 2, 2]
    # 16 x 10 -> shorter side 8 by an antialiased bilinear resize: 12 x 8, center crop columns 2..9; PIL's
    # kernel (the pipeline before torchvision.io) and torchvision's uint8 kernel round alike to within 1
    resized = Image.open(tmp_path / "val" / "cat" / "1.png").resize((12, 8), Image.BILINEAR)
    expected = torch.tensor(np.asarray(resized)[:, 2:10]).permute(2, 0, 1)
    assert (images[3].int() - expected.int()).abs().max() <= 1


def test_imagefolder_uses_test_folder_but_imagenet_needs_val(tmp_path):
    make_tree(tmp_path, splits=("train", "test"))
    assert len(build_dataset(folder_cfg(tmp_path), "imagefolder", "test")) == 6
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}/val' does not exist"):
        build_dataset(folder_cfg(tmp_path), "imagenet", "test")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}/nowhere' \\(DATASETS.ROOT\\) does not exist"):
        build_dataset(folder_cfg(tmp_path / "nowhere"), "imagenet", "train")
    make_tree(tmp_path, splits=("val",))
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path}/train' does not exist"):
        build_dataset(folder_cfg(tmp_path), "imagenet", "train")


def test_empty_and_unknown_class_folders_are_errors(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=f"class folder '{tmp_path}/train/dog' has no images"):
        build_dataset(folder_cfg(tmp_path), "imagefolder", "train")
    (tmp_path / "train" / "dog" / "notes.txt").unlink()
    (tmp_path / "train" / "dog").rmdir()
    write_png(tmp_path / "val" / "eel" / "0.png", seed=9)
    with pytest.raises(ValueError, match=f"'{tmp_path}/val/eel' is not one of the 3 classes"):
        build_dataset(folder_cfg(tmp_path), "imagefolder", "test")


def test_more_folder_classes_than_model_outputs_is_an_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match="has 3 classes but MODEL.NUM_CLASSES is 2"):
        build_dataset(folder_cfg(tmp_path, **{"MODEL.NUM_CLASSES": 2}), "imagefolder", "train")


def corrupt_tree(root):
    make_tree(root)
    (root / "val" / "ant" / "0.png").write_bytes(b"this is not a png")
    png = (root / "val" / "cat" / "1.png").read_bytes()
    (root / "val" / "cat" / "1.png").write_bytes(png[: len(png) // 2])  # truncated
    return root


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
    corrupt_tree(tmp_path)
    dataset = build_dataset(folder_cfg(tmp_path), "imagefolder", "test")
    with pytest.raises(CorruptImageError, match=f"cannot read image '{tmp_path}/val/ant/0.png'"):
        dataset[0]
    with pytest.raises(CorruptImageError, match=f"'{tmp_path}/val/cat/1.png'"):
        dataset[5]
    with pytest.raises(CorruptImageError, match="ant/0.png"):
        next(iter(build_test_loader(folder_cfg(tmp_path), "imagefolder", rank=0, world_size=1)))


def test_skip_corrupt_substitutes_counts_and_warns(tmp_path, caplog):
    corrupt_tree(tmp_path)
    cfg = folder_cfg(tmp_path, **{"DATALOADER.SKIP_CORRUPT": True})
    dataset = build_dataset(cfg, "imagefolder", "test")
    with caplog.at_level(logging.WARNING, logger="msgc.data.datasets"):
        assert dataset[0][1] == 0 and torch.equal(dataset[0][0], dataset[1][0])  # replaced by ant/1.png
        assert dataset[5][1] == 0 and torch.equal(dataset[5][0], dataset[1][0])  # wraps around past the end
        images, labels = next(iter(build_test_loader(cfg, rank=0, world_size=1)))
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0, 0, 1, 1, 2, 0]
    assert dataset.skipped == {str(tmp_path / "val" / name) for name in ("ant/0.png", "cat/1.png")}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # once per file in this dataset, once per file in the loader's copy
    assert "ant/0.png" in warnings[0] and "1 corrupt file(s) skipped" in warnings[0]
    assert "cat/1.png" in warnings[1] and "2 corrupt file(s) skipped" in warnings[1]
