"""Every postprocess mode leaves PyTorch through AOTInductor: per-level selection
with a score factor (FCOS), per-level with the factor after selection, class-agnostic
NMS and an allow-list (mmdet ATSS), per-image single-label selection of decoded
cxcywh boxes (YOLOv8). The exported program's shape contract is checked without
compiling (fast); the compiled packages equal eager ``ssd_post.postprocess`` bit for
bit at batch sizes other than the export's (slow).

The ATSS mode uses the "box" coder (exp) and FCOS the "linear" one; YOLOv8 gives boxes."""

from __future__ import annotations

from typing import Dict

import pytest
import torch

import ssd_post
from ssd_post import aoti
from ssd_post.exportable import PostprocessModule, batch_dynamic_shapes, detections_from_outputs

from common_utils import assert_same_detections

LEVELS = [120, 48, 12]  # three feature levels, 180 anchors
CLASSES = 6


def _anchors() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(sum(LEVELS), 2, generator=generator) * 100
    return torch.cat((xy, xy + 8 + torch.rand(sum(LEVELS), 2, generator=generator) * 30), dim=1)


# name -> (config, anchors or None, level_sizes or None, with a score factor)
MODES = {
    "fcos": (
        ssd_post.PostprocessConfig(
            score_activation="sigmoid",
            background_class=None,
            selection="per_level",
            score_factor_mode="sqrt",
            box_coder="linear",
            topk_candidates=40,
            detections_per_img=30,
            score_thresh=0.2,
        ),
        True,
        LEVELS,
        True,
    ),
    "atss_agnostic_allow_list": (
        ssd_post.PostprocessConfig.from_preset(
            "mmdet_atss", class_agnostic=True, classes=(0, 2, 3, 5), topk_candidates=40
        ),
        True,
        LEVELS,
        True,
    ),
    "yolov8": (
        ssd_post.PostprocessConfig.from_preset("yolov8", detections_per_img=25),
        False,
        None,
        False,
    ),
}


def _inputs(name: str, batch: int, seed: int) -> Dict[str, torch.Tensor]:
    config, _, _, factor = MODES[name]
    generator = torch.Generator().manual_seed(seed)
    anchors_n = sum(LEVELS)
    if config.box_coder == "none":  # decoded (cx, cy, w, h) and probabilities
        centres = torch.rand(batch, anchors_n, 2, generator=generator) * 100
        sizes = torch.rand(batch, anchors_n, 2, generator=generator) * 30 + 4
        locs = torch.cat((centres, sizes), dim=2)
        logits = torch.rand(batch, anchors_n, CLASSES, generator=generator) ** 3
    else:
        locs = torch.randn(batch, anchors_n, 4, generator=generator) * 0.3
        logits = torch.randn(batch, anchors_n, CLASSES, generator=generator) * 2 - 1
    inputs = {"locs": locs, "logits": logits}
    inputs["image_sizes"] = torch.tensor([[110, 120]] * batch, dtype=torch.int64)
    if factor:
        inputs["score_factor"] = torch.randn(batch, anchors_n, 1, generator=generator)
    return inputs


def _module(name: str) -> PostprocessModule:
    config, with_anchors, levels, factor = MODES[name]
    return PostprocessModule(_anchors() if with_anchors else None, config, levels, factor).eval()


def _args(module: PostprocessModule, inputs: Dict[str, torch.Tensor]):
    return tuple(inputs[name] for name in module.input_names)


def _eager(name: str, inputs: Dict[str, torch.Tensor]) -> ssd_post.Detections:
    config, with_anchors, levels, _ = MODES[name]
    return ssd_post.postprocess(
        inputs["locs"],
        inputs["logits"],
        _anchors() if with_anchors else None,
        inputs["image_sizes"] if config.clip_boxes else None,
        config,
        level_sizes=levels,
        score_factor=inputs.get("score_factor"),
    )


@pytest.mark.parametrize("name", list(MODES))
def test_the_exported_program_keeps_the_shape_contract(name):
    module = _module(name)
    config = MODES[name][0]
    padded = config.padded_detections(sum(LEVELS), CLASSES)
    batch = torch.export.Dim("batch", min=1, max=8)
    args = _args(module, _inputs(name, 2, 0))
    shapes = batch_dynamic_shapes(module, args, batch)
    program = torch.export.export(module, args, dynamic_shapes=shapes)
    for batch_size in (1, 3):
        outputs = program.module()(*_args(module, _inputs(name, batch_size, batch_size)))
        boxes, scores, labels, counts, anchors = outputs
        assert boxes.shape == (batch_size, padded, 4) and boxes.dtype == torch.float32
        assert scores.shape == labels.shape == anchors.shape == (batch_size, padded)
        assert labels.dtype == counts.dtype == anchors.dtype == torch.int64
        want = _eager(name, _inputs(name, batch_size, batch_size))
        assert_same_detections(detections_from_outputs(outputs), want)
        assert int(want.num_detections.sum()) > 0


def test_the_inputs_follow_the_config():
    assert _module("fcos").input_names == ["locs", "logits", "image_sizes", "score_factor"]
    assert _module("yolov8").input_names == ["locs", "logits"]  # no clipping, no factor
    ssd = PostprocessModule(_anchors(), ssd_post.PostprocessConfig(clip_boxes=False))
    assert ssd.input_names == ["locs", "logits", "image_sizes"]  # the fused op's inputs


def test_a_missing_example_input_is_named(tmp_path):
    config, _, levels, _ = MODES["fcos"]
    inputs = _inputs("fcos", 2, 0)
    with pytest.raises(ValueError, match=r"give \['image_sizes'\]"):
        aoti.export_postprocess_package(
            _anchors(),
            config,
            str(tmp_path / "p.pt2"),
            inputs["locs"],
            inputs["logits"],
            level_sizes=levels,
            example_score_factor=inputs["score_factor"],
        )


@pytest.mark.slow  # a C++ compilation of about 10 s a package
@pytest.mark.parametrize("name", list(MODES))
def test_the_package_equals_eager(name, tmp_path):
    config, with_anchors, levels, factor = MODES[name]
    example = _inputs(name, 2, 0)
    path = aoti.export_postprocess_package(
        _anchors() if with_anchors else None,
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
    module = _module(name)
    for batch_size in (1, 3):
        inputs = _inputs(name, batch_size, 10 + batch_size)
        got = detections_from_outputs(runner(*_args(module, inputs)))
        # Bit for bit: selection, scores and NMS run in the ops, the "box" coder's
        # decode too (op decode_boxes: Inductor would compile its exp differently).
        assert_same_detections(got, _eager(name, inputs))
