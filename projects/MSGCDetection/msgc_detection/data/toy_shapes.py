"""A generated detection set of simple shapes on textured backgrounds, written as COCO json + PNGs.

Four classes (circle, square, triangle, cross) of random colours, sizes (small and medium in COCO's
terms), positions and rotations, 1-5 per image without overlap, on four kinds of background texture
(noisy gradients, stripes, checkerboards, blotches). Image ``i`` of a split depends only on
``(seed, split, i)``, so the set is the same on every machine. Boxes are the tight boxes of the drawn
pixels. The dataset catalog generates it when a run needs it (``toy_shapes_train``/``toy_shapes_val``);
``generate_toy_shapes(root)`` writes it anywhere.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "generate_toy_shapes", "toy_paths"]

CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(("circle", "square", "triangle", "cross"))]
_SPLIT_CODES = {"train": 1, "val": 2}


def toy_paths(root: str, split: str):
    """(json file, image folder) of a split of the toy set under ``root``."""
    return os.path.join(root, "annotations", f"instances_{split}.json"), os.path.join(root, split)


def _background(rng, size):
    kind = rng.integers(4)
    base = rng.uniform(40, 215, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:  # noisy gradient
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xx * math.cos(angle) + yy * math.sin(angle))[..., None] * rng.uniform(-60, 60, 3)
        img = base + ramp + rng.normal(0, 12, (size, size, 3))
    elif kind == 1:  # stripes
        angle, period = rng.uniform(0, math.pi), rng.uniform(6, 20)
        wave = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) * size / period)
        img = base + wave[..., None] * rng.uniform(10, 35, 3)
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(5, 17))
        board = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2).astype(np.float32)
        img = base + (board[..., None] - 0.5) * rng.uniform(15, 50, 3)
    else:  # blotches: low-frequency noise
        coarse = rng.normal(0, 1, (6, 6, 3)).astype(np.float32)
        up = np.asarray(Image.fromarray(((coarse + 3) * 40).clip(0, 255).astype(np.uint8)).resize(
            (size, size), Image.BICUBIC), dtype=np.float32) / 40 - 3
        img = base + up * 20
    return img.clip(0, 255)


def _polygon(kind, cx, cy, r, angle):
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        r = r / math.sqrt(2) * 1.2
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    else:  # cross: a plus sign of arm width 2/3
        t = 1.0 / 3
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
               (-1, -t), (-t, -t)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _draw_shape(rng, kind, size, taken):
    """Draw one shape's mask at a free place; returns (mask, box x1 y1 x2 y2) or None if no place."""
    for _ in range(20):
        r = rng.uniform(6, 22)
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=255)
        m = np.asarray(mask) > 0
        ys, xs = np.nonzero(m)
        if len(xs) < 16:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        if all(box[0] >= b[2] + 2 or b[0] >= box[2] + 2 or box[1] >= b[3] + 2 or b[1] >= box[3] + 2
               for b in taken):
            return m, box
    return None


def _colour(rng, background_mean):
    """A saturated colour far enough from the background's mean to be seen."""
    for _ in range(50):
        hue = rng.uniform(0, 1)
        rgb = np.array([max(0.0, min(1.0, abs(((hue * 6 + k) % 6) - 3) - 1)) for k in (0, 4, 2)])
        rgb = 255 * (0.15 + 0.85 * rgb) * rng.uniform(0.6, 1.0)
        if np.abs(rgb - background_mean).sum() > 120:
            return rgb
    return 255 - background_mean


def render_image(seed: int, split: str, index: int, size: int = 128):
    """One image (uint8 H x W x 3) and its annotations [(category_id, (x1, y1, x2, y2))]."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    img = _background(rng, size)
    taken, anns = [], []
    for _ in range(int(rng.integers(1, 6))):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        found = _draw_shape(rng, cat["name"], size, taken)
        if found is None:
            continue
        mask, box = found
        img[mask] = _colour(rng, img[mask].mean(0)) + rng.normal(0, 6, (int(mask.sum()), 3))
        taken.append(box)
        anns.append((cat["id"], box))
    return img.clip(0, 255).astype(np.uint8), anns


def _write_split(root, split, num_images, size, seed):
    json_file, image_dir = toy_paths(root, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img, anns = render_image(seed, split, i, size)
        name = f"{i:06d}.png"
        Image.fromarray(img).save(os.path.join(image_dir, name))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for cat, (x1, y1, x2, y2) in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0})
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)


def generate_toy_shapes(root: str, num_train: int = 800, num_val: int = 100, size: int = 128,
                        seed: int = 0) -> str:
    """Write the toy set (train and val splits) under ``root`` unless it is there already.

    The set is written to a temporary folder beside ``root`` and renamed into place, so an
    interrupted run never leaves a partial set that looks complete. Returns ``root``.
    """
    if os.path.exists(toy_paths(root, "val")[0]):
        return root
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".toy_shapes.", dir=parent)
    try:
        _write_split(tmp, "train", num_train, size, seed)
        _write_split(tmp, "val", num_val, size, seed)
        os.rename(tmp, root)
    except OSError:
        if not os.path.exists(toy_paths(root, "val")[0]):  # not another process finishing first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
