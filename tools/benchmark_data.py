#!/usr/bin/env python
"""Images per second of a config's training loader alone (no model), per core and in total.

    python tools/benchmark_data.py --config-file CFG [--workers N] [--batch-size B] [--batches K] \\
        [--repeats R] [--folder DIR] [--num-images N] [--json] [KEY VALUE ...]

It builds the training loader of the config (``msgc.data.build_train_loader``: decoding, crop, resize,
flip, collation) for one process, reads ``--warmup`` batches (workers start, files enter the page
cache), then times ``--batches`` batches, ``--repeats`` times, and reports the median. With ``--workers
0`` the loading runs in this process on one thread (``torch.set_num_threads(--threads)``, default 1);
with N workers, each worker is one single-threaded process. Two rates are reported: images per
second of wall-clock time (the total), and images per CPU-second of this process and its DataLoader
workers together (per core: read from ``/proc``, so it holds on a machine that other jobs share, where
the wall-clock rate of N workers falls short of N cores; without ``/proc`` it is the total divided
by ``max(1, N)``).

The dataset is the config's (``DATASETS.TRAIN``, ``DATASETS.ROOT``). When its folder does not exist,
or with ``--folder DIR``, the loader reads an image folder of generated ImageNet-like JPEGs instead:
``--num-images`` (200) photograph-like images of 500 x 375 at JPEG quality 90 (about 60 KB each;
ImageNet's average is about 110 KB) in 10 class folders, written to DIR (kept) or to a temporary folder.

With ``INPUT.DECODE_DEVICE cuda`` (and ``--workers 0``: decoding runs in the training process) the JPEGs
are decoded by nvjpeg and cropped on the GPU; the clock is read after the GPU's work is done.

``--compare-eval N`` measures instead how the test pipeline's images (and a model's outputs on them)
differ between the PIL path (PIL decode and resize: msgc's pipeline before torchvision.io decoding)
and torchvision.io's, on N JPEGs of ``val/`` (the dataset's, or generated ones): the largest pixel
difference after decoding and after the test transform; the logit differences, top-1 and top-5
agreement of the config's model (``MODEL.WEIGHTS``, or random weights seeded with ``SEED`` with
``MODEL.WEIGHTS ""``), and how many images got other MACs (a gate near its threshold decided
otherwise) with the largest logit difference of the others. The PIL path is main's test loader at
commit 438ab82 bit for bit (PIL decode, PIL resize; normalised as that loader did).

The tool uses only names that earlier msgc versions have, so the pipeline of another checkout can be
measured on the same JPEGs: ``PYTHONPATH=<checkout> python tools/benchmark_data.py ...`` (the output
names the msgc package it measured).
"""
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

import msgc
from msgc.config import load_cfg
from msgc.engine import add_import_argument, import_user_modules
from msgc.data import build_train_loader, check_dataset
from msgc.utils.errors import ArgumentParser, MissingFileError, exit_on_user_error

#: the generated set: 500 x 375 JPEGs (ImageNet's most common size) at quality 90, in 10 classes
IMAGE_SIZE, JPEG_QUALITY, NUM_CLASSES = (500, 375), 90, 10


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the config whose training loader is measured")
    add_import_argument(parser)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per repeat (default 20)")
    parser.add_argument("--warmup", type=int, default=4, help="batches read before timing (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    parser.add_argument("--folder", default="", help="use (or generate) the ImageNet-like JPEGs in this folder")
    parser.add_argument("--num-images", type=int, default=200, help="JPEGs to generate (default 200)")
    parser.add_argument("--compare-eval", type=int, default=0, metavar="N",
                        help="compare the PIL and torchvision.io test pipelines on N JPEGs instead of timing")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE pairs")
    args = parser.parse_intermixed_args(argv)
    for name in ("threads", "batch_size", "batches", "repeats", "num_images"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    return args


def imagenet_like(index: int, size=IMAGE_SIZE) -> Image.Image:
    """A deterministic photograph-like RGB image: smooth colour fields, edges, texture and sensor noise."""
    rng = np.random.default_rng(index)
    width, height = size
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (16, 40.0), (64, 14.0)):  # coarse to fine structure
        coarse = rng.normal(0.0, 1.0, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        for c in range(3):
            plane = Image.fromarray(coarse[:, :, c]).resize(size, Image.BICUBIC)
            image[:, :, c] += amplitude * np.asarray(plane)
    edges = np.asarray(Image.fromarray((rng.random((6, 8)) > 0.5).astype(np.uint8) * 255).resize(size, Image.NEAREST))
    image += (edges[:, :, None] / 255.0 - 0.5) * 40.0 * rng.random(3).astype(np.float32)
    image += rng.normal(0.0, 8.0, image.shape).astype(np.float32)
    return Image.fromarray(np.clip(image + 128.0, 0, 255).astype(np.uint8))


def write_imagenet_like(folder: str, num_images: int, size=IMAGE_SIZE, quality: int = JPEG_QUALITY) -> str:
    """``folder/train/<class>/<i>.JPEG`` (and the same ``val/``), unless already there; returns ``folder``."""
    for split in ("train", "val"):
        for i in range(num_images):
            path = os.path.join(folder, split, f"n{i % NUM_CLASSES:08d}", f"{i:06d}.JPEG")
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                imagenet_like(i + (0 if split == "train" else 10 ** 6), size).save(path, quality=quality)
    return folder


def jpeg_files(folder: str, split: str = "train") -> list:
    root = os.path.join(folder, split)
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f.lower().endswith((".jpeg", ".jpg")))


def prepare(args, cfg, tmp):
    """Point cfg at the data to read: the config's dataset, or generated JPEGs. Returns a description."""
    if not args.folder:
        try:
            check_dataset(cfg, cfg.DATASETS.TRAIN, "train")
            if not args.compare_eval or jpeg_files(cfg.DATASETS.ROOT, "val"):
                return f"{cfg.DATASETS.TRAIN} at {cfg.DATASETS.ROOT}"
        except MissingFileError as e:
            print(f"no dataset ({e}): generating {args.num_images} ImageNet-like JPEGs", file=sys.stderr)
    folder = write_imagenet_like(args.folder or tmp, args.num_images)
    files = jpeg_files(folder)
    cfg.DATASETS.TRAIN = cfg.DATASETS.TEST = "imagefolder"
    cfg.DATASETS.ROOT = folder
    cfg.MODEL.NUM_CLASSES = max(cfg.MODEL.NUM_CLASSES, NUM_CLASSES)
    kb = sum(os.path.getsize(f) for f in files) / len(files) / 1000
    return (f"{len(files)} generated JPEGs of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, quality {JPEG_QUALITY}, "
            f"{kb:.0f} KB on average, in {folder}")


def cpu_seconds():
    """CPU seconds used so far by this process (all threads) and its live children (the DataLoader
    workers), or None where ``/proc`` cannot tell."""
    try:
        tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), time.process_time()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            except OSError:  # ended meanwhile
                continue
            if int(fields[1]) == me:
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        return total
    except (OSError, ValueError, AttributeError):
        return None


def time_loader(cfg, args) -> tuple:
    """(the loader's number of workers, [(images per wall-clock second, per CPU-second or None)] of each repeat)."""
    loader = build_train_loader(cfg, rank=0, world_size=1)
    # GPU decoding (INPUT.DECODE_DEVICE cuda) queues work on the GPU: wait for it before reading the clock
    sync = torch.cuda.synchronize if cfg.INPUT.DECODE_DEVICE == "cuda" else (lambda: None)
    batches = iter(loader)
    for _ in range(args.warmup):
        next(batches)
    rates = []
    for _ in range(args.repeats):
        sync()
        start, cpu, images = time.perf_counter(), cpu_seconds(), 0
        for _ in range(args.batches):
            images += len(next(batches)[0])
        sync()
        wall, used = time.perf_counter() - start, cpu_seconds()
        rates.append((images / wall, images / (used - cpu) if cpu is not None and used is not None else None))
    return loader.num_workers, rates


def measure_speed(args, cfg, data) -> dict:
    workers, rates = time_loader(cfg, args)
    total = statistics.median(r[0] for r in rates)
    per_cpu = [r[1] for r in rates]
    per_core = statistics.median(per_cpu) if None not in per_cpu else total / max(1, workers)
    return {"msgc": os.path.dirname(msgc.__file__), "data": data, "workers": workers, "threads": args.threads,
            "batch_size": cfg.SOLVER.IMS_PER_BATCH, "images_per_s": total, "images_per_s_per_core": per_core,
            "per_core_from": "cpu time" if None not in per_cpu else "wall clock / workers",
            "repeats": [r[0] for r in rates], "repeats_per_core": per_cpu}


def compare_eval(args, cfg) -> dict:
    """PIL and torchvision.io test pipelines on the same JPEGs: pixels, logits, top-1."""
    from msgc.checkpoint import MSGCCheckpointer
    from msgc.data import build_normalizer, build_transform, load_rgb, read_image
    from msgc.modeling import build_model

    files = jpeg_files(cfg.DATASETS.ROOT, "val")[: args.compare_eval]
    transform, normalize = build_transform(cfg, "test"), build_normalizer(cfg)
    pil = torch.stack([transform(load_rgb(f)) for f in files])
    tv = torch.stack([transform(read_image(f)) for f in files])
    decoded = max(int((read_image(f).int() - torch.from_numpy(np.array(load_rgb(f))).permute(2, 0, 1).int())
                      .abs().max()) for f in files)
    diff = (pil.int() - tv.int()).abs()
    torch.manual_seed(max(cfg.SEED, 0))  # the same random weights in every run
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        MSGCCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    logits, macs = {}, {}
    with torch.no_grad():
        for name, images in (("pil", pil), ("torchvision", tv)):
            outputs = [model(normalize(b, cfg.MODEL.DEVICE)) for b in images.split(cfg.TEST.IMS_PER_BATCH)]
            logits[name] = torch.cat([o["logits"].cpu() for o in outputs])
            macs[name] = torch.cat([o["macs"].cpu() for o in outputs])
    gap = (logits["pil"] - logits["torchvision"]).abs()
    return {"msgc": os.path.dirname(msgc.__file__), "images": len(files), "weights": cfg.MODEL.WEIGHTS or "random",
            "decoded_max_abs_diff": decoded, "test_crop_max_abs_diff": int(diff.max()),
            "test_crop_pixels_differing": float((diff > 0).double().mean()),
            "test_crop_mean_abs_diff": float(diff.double().mean()),
            "max_abs_logit_diff": float(gap.max()), "mean_abs_logit_diff": float(gap.mean()),
            "logit_std": float(logits["pil"].std()),
            "top1_agreement": float((logits["pil"].argmax(1) == logits["torchvision"].argmax(1)).double().mean()),
            "top5_agreement": float((_top5(logits["pil"]) == _top5(logits["torchvision"])).all(1).double().mean()),
            "images_with_other_macs": int((macs["pil"] != macs["torchvision"]).sum()),  # a gate decided otherwise
            "max_abs_logit_diff_same_macs": float(torch.cat([gap[macs["pil"] == macs["torchvision"]].flatten(),
                                                             torch.zeros(1)]).max())}


def _top5(logits):
    return logits.topk(min(5, logits.size(1)), 1).indices.sort(1).values


def main(argv=None):
    args = parse_args(argv)
    cfg = load_cfg(args.config_file, args.opts)
    import_user_modules(cfg, args)
    cfg.MODEL.DEVICE = cfg.MODEL.DEVICE if torch.cuda.is_available() else "cpu"
    if args.workers is not None:
        cfg.DATALOADER.NUM_WORKERS = args.workers
    cfg.SOLVER.IMS_PER_BATCH = args.batch_size
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="msgc_jpegs_") as tmp:
        data = prepare(args, cfg, tmp)
        result = compare_eval(args, cfg) if args.compare_eval else measure_speed(args, cfg, data)
    result["data"] = data
    if args.json:
        print(json.dumps(result))
    elif args.compare_eval:
        print(tabulate([[k, v] for k, v in result.items()], tablefmt="pipe", headers=["measure", "value"]))
    else:
        print(f"msgc: {result['msgc']}\ndata: {data}")
        print(tabulate([[result["workers"], result["threads"], result["batch_size"], f"{result['images_per_s']:.0f}",
                         f"{result['images_per_s_per_core']:.0f} ({result['per_core_from']})",
                         " ".join(f"{r:.0f}" for r in result["repeats"])]], tablefmt="pipe",
                       headers=["workers", "threads", "batch", "images/s", "images/s per core", "repeats (images/s)"]))
    return result


if __name__ == "__main__":
    with exit_on_user_error():
        main()
