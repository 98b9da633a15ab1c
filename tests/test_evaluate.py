"""evaluate.py and ssd_post.evaluation: metrics, timing, box mapping, pictures, CLI errors,
and equal mAP between postprocess paths and between 1 and 2 processes."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from ssd_post import Detections
from ssd_post.evaluation import (
    METRIC_KEYS,
    StageTimer,
    coco_evaluate,
    detections_to_coco,
    draw_detections,
    get_postprocess,
    max_over_ranks,
    merge_rank_results,
    save_visualizations,
    scale_to_original,
)


def make_coco(images, annotations, categories=((1, "circle"), (2, "square"))) -> COCO:
    """An in-memory ground truth: images [(id, h, w)], annotations [(image_id, category, xywh)]."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i:06d}.png"} for i, h, w in images],
        "annotations": [
            {"id": n + 1, "image_id": i, "category_id": c, "bbox": list(b), "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": name} for c, name in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


GT_ANNOTATIONS = [
    (1, 1, (10.0, 10.0, 40.0, 40.0)),
    (1, 2, (60.0, 20.0, 30.0, 50.0)),
    (2, 2, (5.0, 50.0, 80.0, 60.0)),
]


def perfect_results(annotations=GT_ANNOTATIONS):
    return [{"image_id": i, "category_id": c, "bbox": list(b), "score": 0.9} for i, c, b in annotations]


# ---------------------------------------------------------------- COCOeval wrapper


def test_coco_evaluate_perfect_detections_score_one():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    metrics = coco_evaluate(coco, perfect_results(), [1, 2])
    assert len(metrics["stats"]) == 12
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["mar_100"] == pytest.approx(1.0)
    for key, index in METRIC_KEYS.items():
        assert metrics[key] == metrics["stats"][index]
    assert "Average Precision" in metrics["summary"]


def test_coco_evaluate_leaves_results_unchanged():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    results = perfect_results()
    before = json.dumps(results)
    coco_evaluate(coco, results, [1, 2])
    assert json.dumps(results) == before  # loadRes would have added area/id/segmentation


def test_coco_evaluate_without_detections_is_zero_not_a_crash():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    metrics = coco_evaluate(coco, [], [1, 2])
    assert metrics["map"] == 0.0
    assert metrics["mar_100"] == 0.0


def test_coco_evaluate_counts_only_the_evaluated_images():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    only_first = [r for r in perfect_results() if r["image_id"] == 1]
    assert coco_evaluate(coco, only_first, [1])["map"] == pytest.approx(1.0)
    # Over both images, image 2's object is missed.
    assert coco_evaluate(coco, only_first, [1, 2])["mar_100"] < 1.0


def test_coco_evaluate_rejects_unknown_and_empty_image_ids():
    coco = make_coco([(1, 120, 100)], GT_ANNOTATIONS[:2])
    with pytest.raises(ValueError, match="not in the annotation file: \\[7\\]"):
        coco_evaluate(coco, [], [1, 7])
    with pytest.raises(ValueError, match="image_ids is empty"):
        coco_evaluate(coco, [], [])


# ---------------------------------------------------------------- mapping to original pixels


def test_scale_to_original_is_orig_over_input_per_axis():
    scale = scale_to_original(torch.tensor([[240, 160], [64, 64]]), (128, 64))
    assert scale.tolist() == [[2.5, 1.875], [1.0, 0.5]]


def test_scale_to_original_rejects_a_bad_input_size():
    with pytest.raises(ValueError, match="input_size should be a positive"):
        scale_to_original(torch.tensor([[10, 10]]), (0, 64))


def test_detections_to_coco_maps_boxes_to_original_pixels_and_categories():
    # One box [8, 16, 24, 48] in a 64x64 network input of an image 128 high, 32 wide.
    detections = Detections(
        boxes=torch.tensor([[[8.0, 16.0, 24.0, 48.0], [0, 0, 0, 0]]]),
        scores=torch.tensor([[0.75, 0.0]]),
        labels=torch.tensor([[1, 0]]),
        num_detections=torch.tensor([1]),
    )
    targets = [{"image_id": torch.tensor(42), "orig_size": torch.tensor([128, 32])}]
    results = detections_to_coco(detections, targets, (64, 64), {1: 7})
    assert results == [{"image_id": 42, "category_id": 7, "bbox": [4.0, 32.0, 8.0, 64.0], "score": 0.75}]


def test_detections_to_coco_needs_one_target_per_image():
    detections = Detections(torch.zeros(2, 1, 4), torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.long),
                            torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one entry per image \\(2\\), got 1"):
        detections_to_coco(detections, [{"image_id": 1, "orig_size": (4, 4)}], (4, 4))


# ---------------------------------------------------------------- timing, gathering, choice


def test_stage_timer_sums_each_stage_and_divides_per_image():
    timer = StageTimer()
    timer.add("forward", 0.5)
    timer.add("forward", 0.25)
    with timer.stage("data"):
        pass
    summary = timer.summary(num_images=3)
    assert summary["timing_ms"]["forward"] == pytest.approx(750.0)
    assert summary["timing_ms_per_image"]["forward"] == pytest.approx(250.0)
    assert set(summary["timing_ms"]) == {"data", "forward", "postprocess", "evaluation"}
    assert summary["timing_ms"]["data"] >= 0.0


def test_stage_timer_rejects_an_unknown_stage():
    timer = StageTimer()
    with pytest.raises(ValueError, match="unknown stage 'backward'"):
        with timer.stage("backward"):
            pass
    with pytest.raises(ValueError, match="unknown stage 'load'"):
        timer.add("load", 1.0)


def test_max_over_ranks_takes_the_slowest_rank_per_stage():
    assert max_over_ranks([{"data": 1.0, "forward": 3.0}, {"data": 2.0, "forward": 1.0}]) == {
        "data": 2.0, "forward": 3.0}
    with pytest.raises(ValueError, match="got none"):
        max_over_ranks([])


def test_merge_rank_results_keeps_each_image_once():
    rank0 = {1: [{"image_id": 1, "score": 0.5}], 3: []}
    rank1 = {2: [{"image_id": 2, "score": 0.4}], 1: [{"image_id": 1, "score": 0.5}]}  # 1 repeated as padding
    results, image_ids = merge_rank_results([rank0, rank1])
    assert image_ids == [1, 2, 3]
    assert results == [{"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.4}]


def test_get_postprocess_names_the_unknown_choice():
    assert callable(get_postprocess("ssd_post")) and callable(get_postprocess("torchvision"))
    with pytest.raises(ValueError, match="unknown postprocess 'fast'; expected one of"):
        get_postprocess("fast")


# ---------------------------------------------------------------- pictures


def test_draw_detections_draws_confident_boxes_only():
    image = Image.new("RGB", (100, 80), (0, 0, 0))
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [20.0, 30.0, 40.0, 30.0], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [70.0, 5.0, 20.0, 20.0], "score": 0.1},
    ]
    drawn = draw_detections(image, results, {1: "circle", 2: "square"}, score_min=0.3)
    assert drawn.size == image.size
    assert drawn.getpixel((40, 59)) != (0, 0, 0)   # bottom edge of the confident box
    assert drawn.getpixel((80, 24)) == (0, 0, 0)   # the 0.1 box is not drawn
    assert image.getpixel((40, 59)) == (0, 0, 0)   # the input is not drawn on


def test_save_visualizations_writes_one_png_per_image(tmp_path):
    coco = make_coco([(1, 60, 50), (2, 60, 50)], [(1, 1, (5.0, 5.0, 20.0, 20.0))])
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (50, 60), (30, 30, 30)).save(image_dir / f"{image_id:06d}.png")
    results = [{"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 20.0], "score": 0.8}]
    written = save_visualizations(coco, str(image_dir), results, [1, 2], str(tmp_path / "vis"), limit=1)
    assert [os.path.basename(p) for p in written] == ["000001.png"]
    with Image.open(written[0]) as png:
        assert png.size == (50, 60)
