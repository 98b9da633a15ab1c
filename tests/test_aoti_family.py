"""Every postprocess mode leaves PyTorch through AOTInductor: per-level selection
with a score factor (FCOS), per-level with the factor after selection, class-agnostic
NMS and an allow-list (mmdet ATSS), per-image single-label selection of decoded
cxcywh boxes (YOLOv8). The exported program's shape contract is checked without
compiling (fast); the compiled packages equal eager ``ssd_post.postprocess`` bit for
bit at batch sizes other than the export's (slow).

The ATSS mode uses the "box" coder (exp) and FCOS the "linear" one; YOLOv8 gives boxes."""

from __future__ import annotations


import pytest
import torch

import ssd_post
from ssd_post import aoti
from ssd_post.exportable import PostprocessModule, batch_dynamic_shapes, detections_from_outputs

from common_utils import assert_same_detections
from export_modes import (
    CLASSES,
    LEVELS,
    MODES,
    mode_anchors,
    module_args,
    eager_detections,
    mode_inputs,
    mode_module,
)

# The modes compiled here (export_modes.MODES has more; the ONNX tests run them all).
AOTI_MODES = ["fcos", "atss_agnostic_allow_list", "yolov8"]


@pytest.mark.parametrize("name", AOTI_MODES)
def test_the_exported_program_keeps_the_shape_contract(name):
    module = mode_module(name)
    config = MODES[name][0]
    padded = config.padded_detections(sum(LEVELS), CLASSES)
    batch = torch.export.Dim("batch", min=1, max=8)
    args = module_args(module, mode_inputs(name, 2, 0))
    shapes = batch_dynamic_shapes(module, args, batch)
    program = torch.export.export(module, args, dynamic_shapes=shapes)
    for batch_size in (1, 3):
        outputs = program.module()(*module_args(module, mode_inputs(name, batch_size, batch_size)))
        boxes, scores, labels, counts, anchors = outputs
        assert boxes.shape == (batch_size, padded, 4) and boxes.dtype == torch.float32
        assert scores.shape == labels.shape == anchors.shape == (batch_size, padded)
        assert labels.dtype == counts.dtype == anchors.dtype == torch.int64
        want = eager_detections(name, mode_inputs(name, batch_size, batch_size))
        assert_same_detections(detections_from_outputs(outputs), want)
        assert int(want.num_detections.sum()) > 0


def test_the_inputs_follow_the_config():
    assert mode_module("fcos").input_names == ["locs", "logits", "image_sizes", "score_factor"]
    assert mode_module("yolov8").input_names == ["locs", "logits"]  # no clipping, no factor
    ssd = PostprocessModule(mode_anchors(), ssd_post.PostprocessConfig(clip_boxes=False))
    assert ssd.input_names == ["locs", "logits", "image_sizes"]  # the fused op's inputs


def test_a_missing_example_input_is_named(tmp_path):
    config, _, levels, _ = MODES["fcos"]
    inputs = mode_inputs("fcos", 2, 0)
    with pytest.raises(ValueError, match=r"give \['image_sizes'\]"):
        aoti.export_postprocess_package(
            mode_anchors(),
            config,
            str(tmp_path / "p.pt2"),
            inputs["locs"],
            inputs["logits"],
            level_sizes=levels,
            example_score_factor=inputs["score_factor"],
        )


@pytest.mark.slow  # a C++ compilation of about 10 s a package
@pytest.mark.parametrize("name", AOTI_MODES)
def test_the_package_equals_eager(name, tmp_path):
    config, with_anchors, levels, factor = MODES[name]
    example = mode_inputs(name, 2, 0)
    path = aoti.export_postprocess_package(
        mode_anchors() if with_anchors else None,
        config,
        str(tmp_path / f"{name}.pt2"),
        example["locs"],
        example["logits"],
        example["image_sizes"] if config.clip_boxes else None,
        max_batch=4,
        level_sizes=levels,
        example_score_factor=example.get("score_factor"),
    )
    runner = aoti.load_package(path)
    module = mode_module(name)
    for batch_size in (1, 3):
        inputs = mode_inputs(name, batch_size, 10 + batch_size)
        got = detections_from_outputs(runner(*module_args(module, inputs)))
        # Bit for bit: selection, scores and NMS run in the ops, the "box" coder's
        # decode too (op decode_boxes: Inductor would compile its exp differently).
        assert_same_detections(got, eager_detections(name, inputs))


def _yolo_prediction(batch: int, seed: int) -> torch.Tensor:
    """[B, 4 + nc + nm, N] = [B, 4 + 5 + 2, 300]: boxes in a 320 image, class
    probabilities mostly near 0, two mask coefficients."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 2, 300, generator=generator) * 320
    sizes = torch.rand(batch, 2, 300, generator=generator) * 60 + 4
    probs = torch.rand(batch, 5, 300, generator=generator) ** 6
    return torch.cat((centres, sizes, probs, torch.randn(batch, 2, 300, generator=generator)), 1)


def _assert_yolo_rows(outputs, prediction, nms: dict) -> None:
    """The padded outputs hold non_max_suppression's rows, image by image, bit for bit."""
    got = detections_from_outputs(outputs)
    rows, indices = ssd_post.non_max_suppression(prediction, nc=5, return_idxs=True, **nms)
    assert sum(len(r) for r in rows) > 0
    for image, (want, index) in enumerate(zip(rows, indices)):
        n = int(got.num_detections[image])
        assert n == len(want)
        assert torch.equal(got.boxes[image, :n], want[:, :4])
        assert torch.equal(got.scores[image, :n], want[:, 4])
        assert torch.equal(got.labels[image, :n], want[:, 5].long())
        assert torch.equal(got.anchor_indices[image, :n], index)


YOLO_NMS = {
    "prediction": dict(conf_thres=0.25, iou_thres=0.7, max_det=50, classes=[0, 2, 3]),
    "validation": dict(conf_thres=0.001, iou_thres=0.7, max_det=50, multi_label=True),
}


@pytest.mark.parametrize("regime", list(YOLO_NMS))
def test_the_yolo_program_gives_non_max_suppression_rows(regime):
    from ssd_post.exportable import yolo_postprocess_module

    nms = YOLO_NMS[regime]
    module = yolo_postprocess_module(_yolo_prediction(2, 0), nc=5, **nms).eval()
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(module, (_yolo_prediction(2, 0),), dynamic_shapes=({0: batch},))
    for batch_size in (1, 3):
        prediction = _yolo_prediction(batch_size, batch_size)
        _assert_yolo_rows(program.module()(prediction), prediction, nms)


@pytest.mark.slow  # a C++ compilation
def test_the_yolo_package_gives_non_max_suppression_rows(tmp_path):
    nms = YOLO_NMS["validation"]
    path = aoti.export_yolo_package(
        str(tmp_path / "yolo.pt2"), _yolo_prediction(2, 0), max_batch=4, nc=5, **nms
    )
    runner = aoti.load_package(path)
    for batch_size in (1, 3):
        prediction = _yolo_prediction(batch_size, 10 + batch_size)
        _assert_yolo_rows(runner(prediction), prediction, nms)
