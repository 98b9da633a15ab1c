"""Data: the shapes generator, the COCO reader and its bad-input handling, the transforms."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from models import TINY_MEAN as MEAN, TINY_STD as STD
from training.config import AugmentConfig
from training.data.coco import CocoDetectionDataset, CocoFormatError, collate_fn
from training.evaluation import coco_evaluate
from training.data.shapes import ensure_shapes_dataset
from training.data.transforms import eval_transforms, train_transforms


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "set")
    return ensure_shapes_dataset(root, seed=3, num_train=24, num_val=6)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_shapes_is_deterministic_and_idempotent(shapes, tmp_path):
    image_dir, ann_file = shapes["train"]
    stamp = os.path.getmtime(ann_file)
    again = ensure_shapes_dataset(os.path.dirname(image_dir), seed=3, num_train=24, num_val=6)
    assert again == shapes and os.path.getmtime(ann_file) == stamp  # reused, not rewritten
    other = ensure_shapes_dataset(str(tmp_path / "copy"), seed=3, num_train=24, num_val=6)
    assert _read(other["train"][1]) == _read(ann_file)
    assert _read(os.path.join(other["train"][0], "000005.png")) == _read(
        os.path.join(image_dir, "000005.png")
    )
    reseeded = ensure_shapes_dataset(str(tmp_path / "seed4"), seed=4, num_train=24, num_val=6)
    assert _read(reseeded["train"][1]) != _read(ann_file)
    with pytest.raises(ValueError, match="num_train"):
        ensure_shapes_dataset(os.path.dirname(image_dir), seed=3, num_train=25, num_val=6)


def test_shapes_content(shapes):
    with open(shapes["train"][1]) as f:
        data = json.load(f)
    assert {c["name"] for c in data["categories"]} == {"circle", "square", "triangle", "star"}
    per_image = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    assert min(len(v) for v in per_image.values()) >= 2  # several objects per image
    sides = [min(b[2], b[3]) for b in sum(per_image.values(), [])]
    assert min(sides) < 20 and max(sides) > 40  # small and large
    overlapping = 0
    for boxes in per_image.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlapping += min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(
                    a[1] + a[3], b[1] + b[3]
                ) > max(a[1], b[1])
    assert overlapping > 0
    image = cv2.imread(os.path.join(shapes["train"][0], data["images"][0]["file_name"]))
    assert image.shape[:2] == (data["images"][0]["height"], data["images"][0]["width"])
    assert image.std() > 10  # textured, not flat


def test_pycocotools_scores_ground_truth_as_perfect(shapes):
    dataset = CocoDetectionDataset(*shapes["val"])
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in dataset.coco.dataset["annotations"]
    ]
    image_ids = dataset.coco.getImgIds()
    assert coco_evaluate(dataset.coco, results, image_ids)["map"] == pytest.approx(1.0)
    assert coco_evaluate(dataset.coco, [], image_ids)["map"] == 0.0


def test_reader_item_and_eval_transform(shapes):
    raw = CocoDetectionDataset(*shapes["val"])
    resized = CocoDetectionDataset(*shapes["val"], transform=eval_transforms((64, 96), MEAN, STD))
    image, target = raw[0]
    small, small_target = resized[0]
    h, w = target["orig_size"]
    assert image.shape == (3, h, w) and small.shape == (3, 64, 96) and small.dtype == torch.float32
    assert small_target["image_id"] == target["image_id"] == raw.image_ids[0]
    scale = torch.tensor([96 / w, 64 / h, 96 / w, 64 / h])
    torch.testing.assert_close(small_target["boxes"], target["boxes"] * scale, atol=1e-3, rtol=1e-4)
    assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3, 4}
    assert raw.category_names[1] == "circle" and raw.num_classes == 5
    images, targets = collate_fn([resized[0], resized[1]])
    assert images.shape == (2, 3, 64, 96) and len(targets) == 2


def test_train_transform_keeps_boxes_consistent(shapes):
    dataset = CocoDetectionDataset(
        *shapes["train"],
        transform=train_transforms(
            (128, 128),
            MEAN,
            STD,
            AugmentConfig(expand_p=1.0, crop_p=1.0, photometric_p=1.0, max_expand=3.0),
        ),
    )
    seen = 0
    for i in range(len(dataset)):
        image, target = dataset[i]
        boxes = target["boxes"]
        assert image.shape == (3, 128, 128)
        assert boxes.shape[0] == target["labels"].shape[0]
        if len(boxes):
            assert float(boxes.min()) >= 0 and float(boxes.max()) <= 128
            assert bool(((boxes[:, 2:] - boxes[:, :2]) > 0).all())
            seen += len(boxes)
    assert seen > 0


def _write(tmp_path, images, annotations, categories=None, files=True):
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if files:
        for image in images:
            cv2.imwrite(
                str(image_dir / image["file_name"]),
                np.zeros((image["height"], image["width"], 3), np.uint8),
            )
    ann_file = tmp_path / "ann.json"
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    ann_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(image_dir), str(ann_file)


IMAGES = [{"id": 10, "file_name": "a.png", "height": 40, "width": 50}]


def _ann(i, bbox, category=3, **extra):
    return {
        "id": i,
        "image_id": 10,
        "category_id": category,
        "bbox": bbox,
        "area": 1.0,
        "iscrowd": 0,
        **extra,
    }


def test_labels_are_contiguous_or_category_ids(tmp_path):
    paths = _write(tmp_path, IMAGES, [_ann(1, [1, 2, 10, 10], 7), _ann(2, [5, 5, 4, 4], 3)])
    dataset = CocoDetectionDataset(*paths)
    assert dataset.label_to_category == {1: 3, 2: 7} and dataset.category_names == {
        1: "cat",
        2: "dog",
    }
    _, target = dataset[0]
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[1, 2, 11, 12], [5, 5, 9, 9]]
    raw_ids = CocoDetectionDataset(*paths, contiguous_labels=False)
    assert raw_ids[0][1]["labels"].tolist() == [7, 3] and raw_ids.num_classes == 8


def test_outside_and_zero_size_boxes_are_filtered_with_counts(tmp_path, capsys):
    anns = [
        _ann(1, [-5, -5, 20, 20]),
        _ann(2, [10, 10, 0, 5]),
        _ann(3, [60, 10, 5, 5]),
        _ann(4, [1, 1, 5, 5], iscrowd=1),
        _ann(5, [2, 2, 3, 3]),
    ]
    dataset = CocoDetectionDataset(*_write(tmp_path, IMAGES, anns))
    out = capsys.readouterr().out
    assert (
        "ann.json" in out
        and "1 box(es) clipped" in out
        and "2 zero-size" in out
        and "1 crowd" in out
    )
    assert dataset.filter_counts == {"clipped": 1, "empty": 2, "crowd": 1}
    assert dataset[0][1]["boxes"].tolist() == [[0, 0, 15, 15], [2, 2, 5, 5]]
    assert len(dataset.coco.dataset["annotations"]) == 5  # evaluation still sees the file as it is


def test_missing_image_file_is_named(tmp_path):
    images = IMAGES + [{"id": 11, "file_name": "gone.png", "height": 40, "width": 50}]
    paths = _write(tmp_path, images, [])
    os.remove(os.path.join(paths[0], "gone.png"))
    with pytest.raises(FileNotFoundError, match=r"gone.png.*image id 11"):
        CocoDetectionDataset(*paths)


def test_image_size_disagreeing_with_json_is_named(tmp_path):
    paths = _write(tmp_path, IMAGES, [])
    cv2.imwrite(os.path.join(paths[0], "a.png"), np.zeros((30, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="image id 10 is 40x50"):
        CocoDetectionDataset(*paths)[0]


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not valid json"),
        ('{"images": [], "categories": []}', "'annotations'"),
        (
            json.dumps(
                {
                    "images": IMAGES,
                    "annotations": [_ann(4, [1, 2, 3, 4], 99)],
                    "categories": [{"id": 3}],
                }
            ),
            r"annotations\[0\] \(id 4\).*category_id 99",
        ),
        (
            json.dumps(
                {
                    "images": IMAGES,
                    "annotations": [{**_ann(5, [1, 2, 3, 4]), "image_id": 12}],
                    "categories": [{"id": 3}],
                }
            ),
            r"id 5.*image_id 12",
        ),
        (
            json.dumps(
                {"images": IMAGES, "annotations": [_ann(6, [1, 2, 3])], "categories": [{"id": 3}]}
            ),
            r"id 6.*'bbox' should be 4",
        ),
        (
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png"}],
                    "annotations": [],
                    "categories": [{"id": 3}],
                }
            ),
            r"images\[0\]: 'height'",
        ),
        (
            json.dumps({"images": IMAGES + IMAGES, "annotations": [], "categories": [{"id": 3}]}),
            "duplicate image id 10",
        ),
    ],
)
def test_malformed_json_is_named(tmp_path, content, message):
    paths = _write(tmp_path, IMAGES, [])
    with open(paths[1], "w") as f:
        f.write(content)
    with pytest.raises(CocoFormatError, match="ann.json") as info:
        CocoDetectionDataset(*paths)
    assert info.match(message)


def test_missing_files_and_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CocoDetectionDataset(str(tmp_path / "nowhere"), str(tmp_path / "ann.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetectionDataset(str(tmp_path), str(tmp_path / "missing.json"))


def test_eval_transform_normalises_with_the_given_mean_and_std():
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    out = eval_transforms((16, 16), (0.5, 0.25, 0.0), (0.25, 0.5, 1.0))(
        image=image, bboxes=[], labels=[]
    )["image"]
    pixel = 200 / 255
    expected = torch.tensor([(pixel - 0.5) / 0.25, (pixel - 0.25) / 0.5, pixel])
    torch.testing.assert_close(out[:, 8, 8], expected, atol=1e-5, rtol=0)


def test_class_count_that_does_not_fit_the_categories_is_named(shapes):
    dataset = CocoDetectionDataset(*shapes["val"], verbose=False)
    dataset.check_num_classes(5)  # 4 shapes + background
    with pytest.raises(
        ValueError, match=r"num_classes is 3 but .* has 4 categories .* needs 5 classes"
    ):
        dataset.check_num_classes(3)
