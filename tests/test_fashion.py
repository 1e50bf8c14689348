"""The IDX reader and the Fashion-MNIST datasets, on IDX files the tests write."""
import gzip
import os
import struct
from collections import Counter

import numpy as np
import pytest
import torch

from msgc.config import get_cfg
from msgc.data import build_dataset, build_test_loader, check_dataset, fashion_mnist_split
from msgc.data import datasets
from msgc.data.idx import read_idx
from msgc.utils.errors import InvalidValueError, MissingFileError

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file's bytes, written independently of the reader: magic, big-endian dims, big-endian data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    head = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return head + array.astype(dtype).tobytes()


def write_idx(path, array, gz=True, type_code=0x08):
    data = idx_bytes(array, type_code)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_fashion(folder, n_train=240, n_test=60, gz=True, seed=0):
    """Four IDX files of random 28x28 images whose labels cycle through the 10 classes; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) * 7 + seed) % 10
        write_idx(folder / FILES[part][0], images, gz)
        write_idx(folder / FILES[part][1], labels.astype(np.uint8), gz)
        arrays[part] = (images, labels)
    return arrays


def fashion_cfg(root):
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.NUM_CLASSES", "10", "DATASETS.ROOT", str(root),
                         "DATALOADER.NUM_WORKERS", "0", "INPUT.TEST_RESIZE", "28", "INPUT.TEST_SIZE", "28",
                         "TEST.IMS_PER_BATCH", "16"])
    return cfg


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gives_the_written_arrays(tmp_path, gz):
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "a", images, gz)
    got = read_idx(str(tmp_path / ("a.gz" if gz else "a")), (None, 28, 28))
    assert got.dtype == np.uint8 and got.shape == (3, 28, 28) and (got == images).all()
    values = np.array([[-3, 2], [7, -32768]])
    write_idx(tmp_path / "s", values, gz=False, type_code=0x0B)
    assert read_idx(str(tmp_path / "s")).tolist() == values.tolist()  # big-endian int16 read as numbers
    floats = np.array([0.5, -2.25, 1e-3], dtype=np.float32)
    write_idx(tmp_path / "f", floats, gz=False, type_code=0x0D)
    assert read_idx(str(tmp_path / "f")).tolist() == floats.tolist()


def test_read_idx_names_the_file_of_bad_contents(tmp_path):
    good = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    cases = {"cut": good[:-5], "long": good + b"\0", "magic": b"\x08\x03" + good[2:], "header": good[:9],
             "empty": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(InvalidValueError, match=r"IDX file '.*cut' is truncated: 3147 bytes for a 4x28x28 array of "
                                                r"1-byte values \(3152 bytes"):
        read_idx(str(tmp_path / "cut"))
    with pytest.raises(InvalidValueError, match=r"'.*long' is longer than its header says"):
        read_idx(str(tmp_path / "long"))
    with pytest.raises(InvalidValueError, match=r"'.*magic' is not an IDX file \(its magic number is 08030803\)"):
        read_idx(str(tmp_path / "magic"))
    with pytest.raises(InvalidValueError, match=r"'.*header' is truncated: its header of 3 dimensions is cut off"):
        read_idx(str(tmp_path / "header"))
    with pytest.raises(InvalidValueError, match=r"'.*empty' is not an IDX file \(its magic number is missing\)"):
        read_idx(str(tmp_path / "empty"))
    (tmp_path / "ok").write_bytes(good)
    with pytest.raises(InvalidValueError, match=r"'.*ok' holds a 4x28x28 array; ok should be N"):
        read_idx(str(tmp_path / "ok"), (None,))
    gz = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(InvalidValueError, match=r"IDX file '.*cut.gz' cannot be read"):
        read_idx(str(tmp_path / "cut.gz"))


def test_fashion_mnist_splits_read_the_files_and_hold_out_a_disjoint_validation_split(tmp_path):
    arrays = fake_fashion(tmp_path / "fm")
    cfg = fashion_cfg(tmp_path / "fm")
    train = build_dataset(cfg, "fashion_mnist", "train", transform=None)
    test = build_dataset(cfg, "fashion_mnist", "test", transform=None)
    val = build_dataset(cfg, "fashion_mnist_val", "test", transform=None)
    assert (len(train), len(val), len(test)) == (220, 20, 60)  # one in 12 of the 240 held out
    assert len(train.classes) == 10 and train.classes[9] == "Ankle boot"
    kept, held = fashion_mnist_split(arrays["train"][1])
    assert not set(kept) & set(held) and sorted(set(kept) | set(held)) == list(range(240))
    assert np.bincount(arrays["train"][1][held], minlength=10).tolist() == [2] * 10  # stratified
    for dataset, (images, labels), index in ((train, arrays["train"], kept), (val, arrays["train"], held),
                                             (test, arrays["test"], np.arange(60))):
        for i in (0, len(dataset) - 1):
            image, label = dataset[i]
            assert image.dtype == torch.uint8 and image.shape == (3, 28, 28)
            assert (image == torch.from_numpy(images[index[i]])).all() and label == labels[index[i]]
    assert fashion_mnist_split(arrays["train"][1])[1].tolist() == held.tolist()  # the same split every time
    loader = build_test_loader(cfg, "fashion_mnist_val")
    assert sum(len(y) for _, y in loader) == 20


def test_fashion_mnist_plain_files_in_a_fashion_mnist_subfolder(tmp_path):
    fake_fashion(tmp_path / "root" / "fashion-mnist", gz=False)
    cfg = fashion_cfg(tmp_path / "root")
    check_dataset(cfg, "fashion_mnist", "train")
    assert len(build_dataset(cfg, "fashion_mnist", "test", transform=None)) == 60


def test_fashion_mnist_missing_or_bad_files_are_one_line_naming_them(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_FOLDER", str(tmp_path / "nowhere"))
    cfg = fashion_cfg(tmp_path / "empty")
    with pytest.raises(MissingFileError, match=r"Fashion-MNIST not found: looked for train-images-idx3-ubyte\[.gz\], "
                       r".*in DATASETS.ROOT '.*empty'.*apt-get install dataset-fashion-mnist"):
        check_dataset(cfg, "fashion_mnist", "train")
    fake_fashion(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MissingFileError, match=r"folder '.*part' lacks t10k-labels-idx1-ubyte\[.gz\]"):
        build_dataset(fashion_cfg(tmp_path / "part"), "fashion_mnist", "test")
    fake_fashion(tmp_path / "shape")
    write_idx(tmp_path / "shape" / "t10k-images-idx3-ubyte", np.zeros((60, 32, 32), np.uint8))
    with pytest.raises(InvalidValueError, match=r"t10k-images-idx3-ubyte.gz' holds a 60x32x32 array; "
                       r"t10k-images-idx3-ubyte.gz should be Nx28x28"):
        build_dataset(fashion_cfg(tmp_path / "shape"), "fashion_mnist", "test")
    fake_fashion(tmp_path / "count")
    write_idx(tmp_path / "count" / "t10k-labels-idx1-ubyte", np.zeros(59, np.uint8))
    with pytest.raises(InvalidValueError, match=r"has 59 labels for the 60 images"):
        build_dataset(fashion_cfg(tmp_path / "count"), "fashion_mnist", "test")
    fake_fashion(tmp_path / "label")
    write_idx(tmp_path / "label" / "t10k-labels-idx1-ubyte", np.full(60, 10, np.uint8))
    with pytest.raises(InvalidValueError, match=r"holds label 10; Fashion-MNIST has 10 classes"):
        build_dataset(fashion_cfg(tmp_path / "label"), "fashion_mnist", "test")


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_SYSTEM_FOLDER),
                    reason="Debian's dataset-fashion-mnist is not installed (CI installs it when run as root)")
def test_the_real_fashion_mnist_files_give_the_standard_splits(tmp_path):
    cfg = fashion_cfg(tmp_path / "empty")  # nothing under DATASETS.ROOT: the package's folder is found
    train = build_dataset(cfg, "fashion_mnist", "train", transform=None)
    val = build_dataset(cfg, "fashion_mnist_val", "test", transform=None)
    test = build_dataset(cfg, "fashion_mnist", "test", transform=None)
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    assert Counter(int(val[i][1]) for i in range(len(val))) == {c: 500 for c in range(10)}
    image, label = test[0]
    assert image.shape == (3, 28, 28) and label == 9  # the first test image is an ankle boot
