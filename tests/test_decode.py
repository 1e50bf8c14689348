"""The input pipeline: torchvision.io decoding against PIL, uint8 transforms, normalisation on the device,
exact resume with workers on JPEGs, a training step on uint8 batches, worker and decode-device settings,
and tools/benchmark_data.py (CPU, small generated images)."""
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from conftest import load_tool
from msgc.config import get_cfg
from msgc.data import (CorruptImageError, Normalizer, TestTransform, TrainTransform, build_dataset,
                       build_normalizer, build_test_loader, build_train_loader, check_decode_device,
                       cores_per_process, load_rgb, loader_workers, read_image, to_device)
from msgc.data.decode import pil_to_uint8
from msgc.engine import SimpleTrainer
from msgc.utils.errors import InvalidValueError

ROOT = Path(__file__).resolve().parents[1]


benchmark_data = load_tool("benchmark_data")


def photo(seed, size=(40, 30)):
    return benchmark_data.imagenet_like(seed, size)


def png16(path, array):
    """A 16-bit PNG (grey ``H x W`` or RGB ``H x W x 3``), written by hand: PIL cannot write 16-bit RGB."""
    array = np.asarray(array, dtype=">u2")
    height, width = array.shape[:2]
    colour = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\x00" + array[y].tobytes() for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def wide16(seed, shape):
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint32).astype(np.uint16)


# kind -> (writer, largest difference between torchvision.io's and PIL's decoded pixels)
KINDS = {
    "rgb.jpg": (lambda p: photo(1).save(p, quality=90), 0),
    "grey.jpg": (lambda p: photo(2).convert("L").save(p, quality=90), 0),
    "cmyk.jpg": (lambda p: photo(3).convert("CMYK").save(p, quality=90), 1),
    "rgb.png": (lambda p: photo(4).save(p), 0),
    "palette.png": (lambda p: photo(5).quantize(64).save(p), 0),
    "rgba.png": (lambda p: photo(6).convert("RGBA").save(p), 0),
    "grey16.png": (lambda p: png16(p, wide16(7, (30, 40))), 0),
    "rgb16.png": (lambda p: png16(p, wide16(8, (30, 40, 3))), 0),
    "rgb.bmp": (lambda p: photo(9).save(p), 0),  # not torchvision.io's: PIL decodes it
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    for name, (write, _) in KINDS.items():
        write(folder / name)
    return folder


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_kind_decodes_to_rgb_uint8_as_pil_does(images, name):
    path = str(images / name)
    image, reference = read_image(path), pil_to_uint8(load_rgb(path))
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40) == reference.shape
    assert (image.int() - reference.int()).abs().max() <= KINDS[name][1]
    if name.startswith("grey"):
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])


def test_sixteen_bit_images_keep_the_high_byte(images):
    grey = torch.from_numpy(wide16(7, (30, 40)).astype(np.int32))
    assert torch.equal(read_image(str(images / "grey16.png"))[0].int(), grey >> 8)
    rgb = torch.from_numpy(wide16(8, (30, 40, 3)).astype(np.int32)).permute(2, 0, 1)
    assert torch.equal(read_image(str(images / "rgb16.png")).int(), rgb >> 8)


@pytest.mark.parametrize("name", ["rgb.jpg", "cmyk.jpg", "grey16.png", "rgb.bmp"])
def test_augmented_and_test_crops_match_the_pil_path(images, name):
    """The same generator gives the same crop and flip to a tensor and to a PIL image; the antialiased
    bilinear kernels of torchvision (uint8) and PIL then round to within 1 of each other (plus the
    decoders' difference)."""
    path = str(images / name)
    tolerance = 1 + KINDS[name][1]
    train = TrainTransform(24, 0.2, flip=True)
    for seed in range(4):
        a = train(read_image(path), torch.Generator().manual_seed(seed))
        b = train(load_rgb(path), torch.Generator().manual_seed(seed))
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 24, 24)
        assert (a.int() - b.int()).abs().max() <= tolerance
    test = TestTransform(20, 16)
    a, b = test(read_image(path)), test(load_rgb(path))
    assert a.shape == b.shape == (3, 16, 16) and (a.int() - b.int()).abs().max() <= tolerance


def test_corrupt_truncated_and_missing_files_are_one_line_errors(tmp_path, images):
    jpeg = (images / "rgb.jpg").read_bytes()
    cases = {"garbage.jpg": b"\xff\xd8 not a jpeg", "short.jpg": jpeg[: len(jpeg) // 2], "empty.png": b"",
             "short.png": (images / "rgb.png").read_bytes()[:200]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorruptImageError, match=f"^cannot read image '{tmp_path / name}': ") as error:
            read_image(str(tmp_path / name))
        assert "\n" not in str(error.value)
    with pytest.raises(CorruptImageError, match="No such file"):
        read_image(str(tmp_path / "absent.jpg"))


def jpeg_tree(root, per_class=3, corrupt=()):
    for c in range(2):
        for i in range(per_class):
            path = root / "train" / f"c{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(10 * c + i, (36, 28)).save(path, quality=90)
    for name in corrupt:
        data = (root / "train" / name).read_bytes()
        (root / "train" / name).write_bytes(data[: len(data) // 3])
    return root


def folder_cfg(root, **overrides):
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.NUM_CLASSES = 2
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = "imagefolder"
    cfg.DATASETS.ROOT = str(root)
    cfg.INPUT.TRAIN_SIZE = 16
    cfg.INPUT.MIN_SCALE = 0.3
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SEED = 2
    cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return cfg


@pytest.fixture
def msgc_log(caplog, monkeypatch):
    """caplog, with msgc's records reaching it (setup_logger stops them at the "msgc" logger)."""
    monkeypatch.setattr(logging.getLogger("msgc"), "propagate", True)
    return caplog


def test_truncated_jpeg_in_a_folder_stops_or_is_skipped_and_counted(tmp_path, msgc_log):
    caplog = msgc_log
    jpeg_tree(tmp_path, corrupt=["c1/0.jpg"])
    dataset = build_dataset(folder_cfg(tmp_path), "imagefolder", "train", transform=None)  # images as read
    with pytest.raises(CorruptImageError, match=f"'{tmp_path}/train/c1/0.jpg'"):
        dataset[3]
    dataset = build_dataset(folder_cfg(tmp_path, **{"DATALOADER.SKIP_CORRUPT": True}), "imagefolder", "train",
                            transform=None)
    with caplog.at_level(logging.WARNING, logger="msgc.data.datasets"):
        image, label = dataset[3]
    assert label == 1 and torch.equal(image, dataset[4][0])  # replaced by c1/1.jpg
    assert dataset.skipped == {str(tmp_path / "train" / "c1" / "0.jpg")}
    assert "1 corrupt file(s) skipped" in caplog.text


def test_jpeg_batches_resume_exactly_with_workers(tmp_path):
    """Decoded with torchvision.io in 2 workers from iteration 3 on, the uint8 batches are those of a run
    without workers from 0: each sample's crop and flip come from its place in the stream."""
    cfg = folder_cfg(jpeg_tree(tmp_path), **{"INPUT.RANDOM_FLIP": True})
    it = iter(build_train_loader(cfg, rank=0, world_size=1))
    full = [next(it) for _ in range(5)]
    cfg.DATALOADER.NUM_WORKERS = 2
    it = iter(build_train_loader(cfg, start_iter=3, rank=0, world_size=1))
    late = [next(it) for _ in range(2)]
    for (a, la), (b, lb) in zip(full[3:], late):
        assert a.dtype == torch.uint8 and a.shape == (4, 3, 16, 16) and torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(full[0][0], full[1][0])


def old_loader_normalisation(image, mean, std):
    """What the loader did per image before images stayed uint8 (torchvision's v2 steps)."""
    steps = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return steps(image)


def test_normalisation_on_the_device_equals_the_loaders_before():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    batch = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = Normalizer(mean, std)(batch, "cpu")
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert torch.equal(out, torch.stack([old_loader_normalisation(x, mean, std) for x in batch]))  # bit for bit
    assert Normalizer(mean, std, channels_last=True)(batch, "cpu").is_contiguous(memory_format=torch.channels_last)
    assert Normalizer(mean, std)(out, "cpu") is out  # float batches are taken as normalised
    unit = Normalizer((0, 0, 0), (1, 1, 1))([batch[0], batch[1, :, :4]], "cpu")  # lists image by image
    assert isinstance(unit, list) and torch.allclose(unit[1], batch[1, :, :4] / 255.0, rtol=0, atol=1e-7)
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    assert not build_normalizer(cfg).channels_last and build_normalizer(cfg).mean == cfg.INPUT.PIXEL_MEAN
    assert to_device(out, "cpu") is out
    with pytest.raises(TypeError, match="uint8 images, which the model cannot take.*build_normalizer"):
        to_device(batch, "cpu")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

    def forward(self, images, labels):
        logits = self.fc(self.conv(images).mean((2, 3)))
        return {"loss_cls": torch.nn.functional.cross_entropy(logits, labels)}


def test_one_training_step_on_uint8_batches_equals_one_on_normalised_floats():
    from msgc.utils.events import EventStorage

    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cpu"
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 1, 0])
    floats = torch.stack([old_loader_normalisation(x, cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD) for x in batch])
    weights = []
    for images, preprocess in ((batch, build_normalizer(cfg)), (floats, None)):
        model = _Tiny()
        trainer = SimpleTrainer(model, [(images, labels)], torch.optim.SGD(model.parameters(), lr=0.5),
                                preprocess=preprocess)
        with EventStorage(0):
            trainer.run_step()
        weights.append(model.conv.weight.detach().clone())
    assert not torch.equal(weights[0], _Tiny().conv.weight) and torch.equal(weights[0], weights[1])


def test_workers_are_capped_at_the_cores_with_a_warning(msgc_log):
    caplog = msgc_log
    cores = cores_per_process()
    with caplog.at_level(logging.WARNING, logger="msgc.data.build"):
        assert loader_workers(cores) == cores and not caplog.text
        assert loader_workers(cores + 7) == cores
    assert f"DATALOADER.NUM_WORKERS={cores + 7} is more than the {cores} CPU core(s)" in caplog.text


def test_test_loader_workers_persist(tmp_path):
    cfg = folder_cfg(jpeg_tree(tmp_path / "data"), **{"DATALOADER.NUM_WORKERS": 1})
    (tmp_path / "data" / "train").rename(tmp_path / "data" / "val")
    jpeg_tree(tmp_path / "data")
    loader = build_test_loader(cfg, rank=0, world_size=1)
    assert loader.persistent_workers and loader.num_workers == 1
    assert not build_train_loader(cfg, rank=0, world_size=1).persistent_workers


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error")
def test_gpu_decoding_without_cuda_is_a_one_line_error(tmp_path):
    with pytest.raises(InvalidValueError, match="^INPUT.DECODE_DEVICE cuda decodes JPEGs on the GPU, but this "
                       "machine has no CUDA device .*: set INPUT.DECODE_DEVICE cpu$"):
        build_train_loader(folder_cfg(jpeg_tree(tmp_path), **{"INPUT.DECODE_DEVICE": "cuda"}), rank=0, world_size=1)
    with pytest.raises(InvalidValueError, match="INPUT.DECODE_DEVICE must be one of cpu, cuda, got 'gpu'"):
        check_decode_device("gpu", 0)


def test_benchmark_data_tool_times_the_loader_and_compares_the_pipelines(tmp_path, capsys):
    quickstart = str(ROOT / "configs" / "quickstart.yaml")
    common = ["--config-file", quickstart, "--folder", str(tmp_path / "jpegs"), "--num-images", "6", "--json"]
    benchmark_data.main(common + ["--workers", "0", "--batch-size", "3", "--batches", "2", "--warmup", "1",
                                  "--repeats", "2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["workers"] == 0 and result["images_per_s"] > 0 and len(result["repeats"]) == 2
    assert result["per_core_from"] == "cpu time" and all(r > 0 for r in result["repeats_per_core"])
    assert "6 generated JPEGs of 500x375" in result["data"]
    benchmark_data.main(common + ["--compare-eval", "4", "MODEL.WEIGHTS", ""])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 4 and result["test_crop_max_abs_diff"] <= 1 and result["decoded_max_abs_diff"] == 0
    assert result["top1_agreement"] == 1.0 and result["max_abs_logit_diff_same_macs"] < 1e-3 * result["logit_std"]


def test_cpu_seconds_count_the_loader_workers():
    """The tool's per-core rate divides by the CPU time of this process and of its live children."""
    import subprocess
    import sys

    spin = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "print('spun', flush=True)\nsys.stdin.read()")
    before = benchmark_data.cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "spun\n"
        used = benchmark_data.cpu_seconds() - before  # the child is alive, waiting on its stdin
    finally:
        child.communicate("")
    assert 0.3 <= used < 10
