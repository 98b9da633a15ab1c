"""A synthetic detection data set: filled shapes on textured backgrounds.

Each image holds a few circles, squares, triangles and stars of random colour, size
(some small) and rotation, some partly overlapping, drawn on a smooth noise texture
with stripes. Images are written as PNG and the boxes as a COCO instances json, so
pycocotools evaluates the set exactly as it evaluates COCO.

Generation is a pure function of (seed, split, image index): the same seed gives
the same files on every machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from .boxes import box_areas, box_overlaps

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
]
# Bump when the drawing changes, so an old data set on disk is not silently reused.
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"

# Subpixel precision of cv2's polygon drawing: coordinates are fixed point with 4 bits.
_SHIFT = 4


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour noise field plus faint stripes: uint8 [H, W, 3]."""
    cells = int(rng.integers(3, 9))
    coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    # Compress towards a random base tone so shapes keep contrast against it.
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    image = base + 0.35 * (smooth - 127.5)
    if rng.random() < 0.6:
        period = rng.uniform(6, 20)
        angle = rng.uniform(0, math.pi)
        step = 2 * math.pi / period
        xx = np.arange(width, dtype=np.float32) * (math.cos(angle) * step)
        yy = np.arange(height, dtype=np.float32) * (math.sin(angle) * step)
        image += rng.uniform(8, 25) * np.sin(yy[:, None] + xx[None, :])[..., None]
    image += 6 * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices [V, 2] (x, y) of a shape centred at (cx, cy)."""
    if kind == "square":
        # Axis-aligned, so its box is tight; the ratio varies a little.
        return np.array(
            [
                [cx - radius, cy - radius],
                [cx + radius, cy - radius],
                [cx + radius, cy + radius],
                [cx - radius, cy + radius],
            ]
        )
    if kind == "triangle":
        t = angle + np.arange(3) * 2 * math.pi / 3
        return np.stack((cx + radius * np.cos(t), cy + radius * np.sin(t)), axis=1)
    if kind == "star":
        t = angle + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
        return np.stack((cx + r * np.cos(t), cy + r * np.sin(t)), axis=1)
    raise ValueError(f"unknown shape kind {kind!r}")


def _box_of(
    kind: str, cx: float, cy: float, radius: float, angle: float
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The tight xyxy box of a shape and its fixed-point polygon (None for a circle)."""
    if kind == "circle":
        return np.array([cx - radius, cy - radius, cx + radius, cy + radius]), None
    fixed = np.round(_polygon(kind, cx, cy, radius, angle) * (1 << _SHIFT)).astype(np.int32)
    drawn = fixed / float(1 << _SHIFT)  # the box of what is drawn, not of the ideal shape
    return np.concatenate((drawn.min(0), drawn.max(0))), fixed


def _overlap_ok(box: np.ndarray, placed: List[np.ndarray]) -> bool:
    """Some overlap is wanted, but no object may be mostly hidden by another."""
    if not placed:
        return True
    others = np.stack(placed)
    inter, iou = box_overlaps(box, others)
    smaller = np.minimum(box_areas(box[None])[0], box_areas(others))
    return not ((iou > 0.3) | (inter / smaller > 0.45)).any()


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> Tuple[int, int, int]:
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - background).sum() > 150:
            break
    return tuple(int(c) for c in colour)


def render_image(
    rng: np.random.Generator, height: int, width: int, max_objects: int = 6
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image (uint8 [H, W, 3], BGR for cv2) and its objects as (category id, xyxy box)."""
    image = _texture(rng, height, width)
    wanted = int(rng.integers(2, max_objects + 1))
    placed: List[np.ndarray] = []
    objects: List[Tuple[int, np.ndarray]] = []
    for _ in range(wanted * 10):  # rejection sampling; a crowded image just gets fewer
        if len(objects) == wanted:
            break
        category = int(rng.integers(1, len(CATEGORIES) + 1))
        kind = CATEGORIES[category - 1]["name"]
        # Log-uniform size: as many small objects (10-20 px) as large ones.
        size = float(np.exp(rng.uniform(math.log(10), math.log(min(height, width) * 0.45))))
        radius = size / 2
        cx = rng.uniform(radius + 1, width - radius - 1)
        cy = rng.uniform(radius + 1, height - radius - 1)
        angle = rng.uniform(0, 2 * math.pi)
        box, fixed = _box_of(kind, cx, cy, radius, angle)
        if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
            continue
        if not _overlap_ok(box, placed):
            continue
        cy0, cx0 = int(cy), int(cx)
        colour = _contrasting_colour(rng, image[cy0, cx0].astype(np.int64))
        if fixed is None:
            cv2.circle(
                image,
                (int(round(cx * 16)), int(round(cy * 16))),
                int(round(radius * 16)),
                colour,
                thickness=-1,
                lineType=cv2.LINE_AA,
                shift=_SHIFT,
            )
        else:
            cv2.fillPoly(image, [fixed], colour, lineType=cv2.LINE_AA, shift=_SHIFT)
        placed.append(box)
        objects.append((category, box))
    return image, objects


def _write_split(root: str, split: str, seed: int, count: int, size_range: Tuple[int, int]) -> None:
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    split_code = {"train": 0, "val": 1}[split]
    for index in range(count):
        rng = np.random.default_rng([seed, split_code, index])
        height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        image, objects = render_image(rng, height, width)
        file_name = f"{index:06d}.png"
        # Light compression: the files are small anyway and writing is the slow part.
        cv2.imwrite(os.path.join(image_dir, file_name), image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for category, box in objects:
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round((x1 - x0) * (y1 - y0), 2),
                    "iscrowd": 0,
                }
            )
    with open(os.path.join(root, f"instances_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)


def _layout(root: str) -> Dict[str, Tuple[str, str]]:
    return {
        split: (os.path.join(root, split), os.path.join(root, f"instances_{split}.json"))
        for split in ("train", "val")
    }


def ensure_shapes_dataset(
    root: str,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 500,
    size_range: Tuple[int, int] = (128, 160),
) -> Dict[str, Tuple[str, str]]:
    """Generates the shapes data set under ``root`` unless it is already there.

    Idempotent: a ``manifest.json`` records the parameters, and a data set with the
    same parameters is reused as is. Generation writes into a temporary folder that
    is renamed into place at the end, so an interrupted run leaves nothing half done.

    Args:
        root: folder of the data set (created).
        seed: the whole data set is a function of it.
        num_train, num_val: images per split.
        size_range: (min, max) image side in pixels; height and width are drawn
            independently in it.

    Returns:
        ``{"train": (image_dir, ann_file), "val": (image_dir, ann_file)}``.

    Raises:
        ValueError: ``root`` holds a data set generated with other parameters.
    """
    params = {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "size_range": [int(size_range[0]), int(size_range[1])],
    }
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val should be >= 1, got {num_train} and {num_val}")
    if not (8 <= size_range[0] <= size_range[1]):
        raise ValueError(
            f"size_range should be (min, max) with 8 <= min <= max, got {tuple(size_range)}"
        )
    root = os.path.abspath(root)
    manifest = os.path.join(root, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            found = json.load(f)
        if found != params:
            raise ValueError(
                f"{root} holds a shapes data set made with {found}, not {params}; "
                "point data_root at another folder or delete this one"
            )
        return _layout(root)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".shapes-", dir=parent)
    try:
        _write_split(staging, "train", seed, num_train, size_range)
        _write_split(staging, "val", seed, num_val, size_range)
        with open(os.path.join(staging, MANIFEST), "w") as f:
            json.dump(params, f)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        try:
            os.rename(staging, root)
        except OSError:
            # Another process finished first (e.g. DDP ranks): keep its copy if it matches.
            if not os.path.exists(manifest):
                raise
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return ensure_shapes_dataset(root, seed, num_train, num_val, size_range)
