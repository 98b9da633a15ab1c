"""A reader for COCO-format detection data sets (image folder + instances json).

The json is checked up front, so a broken file fails at construction with the file
and the entry named, not in a DataLoader worker an hour into training. Boxes that
stick out of their image are clipped, and boxes with no area left (after clipping)
and crowd regions are dropped from the training targets, with a count printed;
``self.coco`` keeps the file's content unchanged, so evaluation sees exactly what
pycocotools would see.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor

Target = Dict[str, Any]


class CocoFormatError(ValueError):
    """The annotation file is malformed or inconsistent."""


def _fail(ann_file: str, where: str, message: str) -> CocoFormatError:
    return CocoFormatError(f"{ann_file}: {where}: {message}")


def load_coco_json(ann_file: str) -> dict:
    """Reads and checks an instances json; raises CocoFormatError naming the entry."""
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{ann_file}: not valid json: {err}") from err
    if not isinstance(data, dict):
        raise _fail(ann_file, "top level", f"should be an object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise _fail(
                ann_file, f"'{key}'", "should be a list" + ("" if key in data else " (missing)")
            )

    image_ids = set()
    for i, image in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(image, dict):
            raise _fail(ann_file, where, "should be an object")
        for key, kind in (("id", int), ("file_name", str), ("height", int), ("width", int)):
            if not isinstance(image.get(key), kind) or isinstance(image.get(key), bool):
                raise _fail(
                    ann_file, where, f"'{key}' should be {kind.__name__}, got {image.get(key)!r}"
                )
        if image["height"] < 1 or image["width"] < 1:
            raise _fail(
                ann_file, where, f"size should be positive, got {image['height']}x{image['width']}"
            )
        if image["id"] in image_ids:
            raise _fail(ann_file, where, f"duplicate image id {image['id']}")
        image_ids.add(image["id"])

    category_ids = set()
    for i, category in enumerate(data["categories"]):
        where = f"categories[{i}]"
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise _fail(ann_file, where, f"should be an object with an int 'id', got {category!r}")
        if category["id"] in category_ids:
            raise _fail(ann_file, where, f"duplicate category id {category['id']}")
        category_ids.add(category["id"])
    if not category_ids:
        raise _fail(ann_file, "'categories'", "is empty")

    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise _fail(ann_file, f"annotations[{i}]", "should be an object")
        where = f"annotations[{i}] (id {ann.get('id')!r})"
        if ann.get("image_id") not in image_ids:
            raise _fail(ann_file, where, f"image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in category_ids:
            raise _fail(
                ann_file, where, f"category_id {ann.get('category_id')!r} is not in 'categories'"
            )
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in bbox
            )
        ):
            raise _fail(
                ann_file, where, f"'bbox' should be 4 finite numbers [x, y, w, h], got {bbox!r}"
            )
    return data


def build_coco(data: dict) -> COCO:
    """A pycocotools COCO over an already loaded dict (without its console chatter)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def clean_boxes(
    anns: Sequence[dict], height: int, width: int
) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Training boxes of one image: xyxy clipped to the image, degenerate and crowd dropped.

    Returns:
        boxes (float32 [n, 4] xyxy pixels), category ids (int64 [n]) and counts of
        what was changed: ``clipped``, ``empty`` (no area after clipping), ``crowd``.
    """
    counts = {"clipped": 0, "empty": 0, "crowd": 0}
    boxes, categories = [], []
    for ann in anns:
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        box = [x, y, x + w, y + h]
        clipped = [
            min(max(box[0], 0.0), width),
            min(max(box[1], 0.0), height),
            min(max(box[2], 0.0), width),
            min(max(box[3], 0.0), height),
        ]
        # Under a tenth of a pixel is no box: albumentations and the matcher would divide by it.
        if clipped[2] - clipped[0] < 0.1 or clipped[3] - clipped[1] < 0.1:
            counts["empty"] += 1
            continue
        if clipped != box:
            counts["clipped"] += 1
        boxes.append(clipped)
        categories.append(int(ann["category_id"]))
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(categories, dtype=np.int64),
        counts,
    )


class CocoDetectionDataset(torch.utils.data.Dataset):
    """COCO-format detection data set.

    Args:
        image_dir: folder holding the images named by ``file_name``.
        ann_file: instances json (COCO format).
        transform: an albumentations ``Compose`` with ``bbox_params`` in
            ``pascal_voc`` format and a ``labels`` label field (see
            :mod:`training.data.transforms`); its output image is a float tensor.
            None: the image as float [0, 1] tensor and the boxes as they are.
        check_files: verify at construction that every image file exists.
        verbose: print the counts of clipped and dropped boxes.
        contiguous_labels: labels 1..K in category id order (default); False makes
            the label the category id itself, as torchvision's 91-column COCO
            models expect (``num_classes`` is then max id + 1).

    Item ``i``: ``(image Tensor[3, H, W] float32, target)`` where target has
    ``boxes`` (Tensor[n, 4] float32, xyxy in the transformed image's pixels),
    ``labels`` (Tensor[n] int64 in 1..K, contiguous), ``image_id`` (int, COCO id) and
    ``orig_size`` ((h, w) of the file).

    Attributes:
        coco: pycocotools ``COCO`` of the annotation file, unmodified.
        label_to_category: contiguous label (1..K, 0 is background) -> COCO category id.
        category_names: label -> category name.
        num_classes: K + 1 (background included), as the models count classes.
    """

    def __init__(
        self,
        image_dir: str,
        ann_file: str,
        transform: Optional[Callable[..., dict]] = None,
        check_files: bool = True,
        verbose: bool = True,
        contiguous_labels: bool = True,
    ) -> None:
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        self.image_dir = image_dir
        self.ann_file = ann_file
        self.transform = transform
        data = load_coco_json(ann_file)
        self.coco = build_coco(data)
        category_ids = sorted(c["id"] for c in data["categories"])
        if contiguous_labels:
            self.label_to_category: Dict[int, int] = {i + 1: c for i, c in enumerate(category_ids)}
        else:
            if category_ids[0] < 1:
                raise CocoFormatError(
                    f"{ann_file}: category id {category_ids[0]} < 1 would be the background label"
                )
            self.label_to_category = {c: c for c in category_ids}
        self.category_to_label: Dict[int, int] = {
            c: label for label, c in self.label_to_category.items()
        }
        names = {c["id"]: str(c.get("name", c["id"])) for c in data["categories"]}
        self.category_names: Dict[int, str] = {
            label: names[c] for label, c in self.label_to_category.items()
        }
        self.num_classes = max(self.label_to_category) + 1
        self.image_ids: List[int] = sorted(self.coco.imgs)

        if check_files:
            missing = [
                (i, self.coco.imgs[i]["file_name"])
                for i in self.image_ids
                if not os.path.isfile(os.path.join(image_dir, self.coco.imgs[i]["file_name"]))
            ]
            if missing:
                image_id, name = missing[0]
                raise FileNotFoundError(
                    f"{ann_file}: {len(missing)} image file(s) missing from {image_dir}, "
                    f"first: {name!r} (image id {image_id})"
                )

        totals = {"clipped": 0, "empty": 0, "crowd": 0}
        self._targets = []
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            boxes, categories, counts = clean_boxes(
                self.coco.imgToAnns.get(image_id, []), info["height"], info["width"]
            )
            labels = np.asarray([self.category_to_label[c] for c in categories], dtype=np.int64)
            self._targets.append((boxes, labels))
            for key in totals:
                totals[key] += counts[key]
        self.filter_counts = totals
        if verbose and any(totals.values()):
            print(
                f"{ann_file}: {totals['clipped']} box(es) clipped to their image, "
                f"{totals['empty']} zero-size box(es) and {totals['crowd']} crowd region(s) "
                "left out of the training targets"
            )

    def check_num_classes(self, num_classes: int) -> None:
        """ValueError unless a model with ``num_classes`` logit columns (background
        included) predicts exactly this set's labels: a mismatch would score a model
        against categories it was not trained on, without a word."""
        if num_classes != self.num_classes:
            layout = (
                "contiguous labels: categories + background"
                if self.num_classes == len(self.label_to_category) + 1
                else "labels = category ids: largest id + 1"
            )
            raise ValueError(
                f"model.num_classes is {num_classes} but {self.ann_file} has "
                f"{len(self.label_to_category)} categories (ids "
                f"{sorted(self.category_to_label)[:8]}), so the model needs {self.num_classes} "
                f"classes ({layout}); use a checkpoint trained on this data, or set "
                f"data.contiguous_labels"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def read_image(self, index: int) -> np.ndarray:
        """The RGB uint8 [H, W, 3] image of item ``index``, checked against its json size."""
        info = self.coco.imgs[self.image_ids[index]]
        path = os.path.join(self.image_dir, info["file_name"])
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise FileNotFoundError(f"cannot read image {path} (image id {info['id']})")
        if image.shape[:2] != (info["height"], info["width"]):
            raise ValueError(
                f"{self.ann_file}: image id {info['id']} is {info['height']}x{info['width']} "
                f"in the json but {path} is {image.shape[0]}x{image.shape[1]}"
            )
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def __getitem__(self, index: int) -> Tuple[Tensor, Target]:
        image = self.read_image(index)
        boxes, labels = self._targets[index]
        orig_size = (int(image.shape[0]), int(image.shape[1]))
        if self.transform is not None:
            out = self.transform(image=image, bboxes=boxes, labels=labels)
            tensor = out["image"]
            if not isinstance(tensor, Tensor):
                tensor = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
            boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
            labels = np.asarray(out["labels"], dtype=np.int64).reshape(-1)
        else:
            tensor = (
                torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
            )
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": int(self.image_ids[index]),
            "orig_size": orig_size,
        }
        return tensor.float(), target


def collate_fn(batch: Sequence[Tuple[Tensor, Target]]) -> Tuple[Tensor, List[Target]]:
    """Stacks the images (all must share one size) and keeps the targets as a list."""
    images = [item[0] for item in batch]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) != 1:
        raise ValueError(
            f"images of a batch should have one shape (resize them), got {sorted(shapes)}"
        )
    return torch.stack(images), [item[1] for item in batch]
