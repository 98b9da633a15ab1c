"""Postprocess modes and their example inputs, shared by the export tests (ONNX in
test_onnx_family.py, AOTInductor in test_aoti_family.py): every selection scope,
score-factor mode, label mode, box coder and NMS grouping of the family on small
tensors (three feature levels, 180 anchors, 6 classes)."""

from __future__ import annotations

from typing import Dict

import torch

import ssd_post
from ssd_post.exportable import PostprocessModule

LEVELS = [120, 48, 12]  # three feature levels, 180 anchors
CLASSES = 6


def mode_anchors() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(sum(LEVELS), 2, generator=generator) * 100
    return torch.cat((xy, xy + 8 + torch.rand(sum(LEVELS), 2, generator=generator) * 30), dim=1)


def _config(**fields) -> ssd_post.PostprocessConfig:
    return ssd_post.PostprocessConfig(**{"topk_candidates": 40, "detections_per_img": 30, **fields})


# name -> (config, anchors or None, level_sizes or None, with a score factor)
MODES = {
    "fcos": (
        _config(
            score_activation="sigmoid",
            background_class=None,
            selection="per_level",
            score_factor_mode="sqrt",
            box_coder="linear",
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
    "retinanet": (
        _config(
            score_activation="sigmoid",
            background_class=None,
            selection="per_level",
            score_thresh=0.3,
        ),
        True,
        LEVELS,
        False,
    ),
    "softmax_per_level_background_last": (
        _config(selection="per_level", background_class="last", score_thresh=0.15),
        True,
        LEVELS,
        False,
    ),
    "efficientdet_per_image": (
        _config(
            score_activation="sigmoid",
            background_class=None,
            selection="per_image",
            score_thresh=0.3,
            topk_candidates=60,
        ),
        True,
        None,
        False,
    ),
    "yolov5_before_threshold_multi_label": (
        ssd_post.PostprocessConfig.from_preset(
            "yolov5", label_mode="multi", score_thresh=0.05, detections_per_img=40
        ),
        False,
        None,
        True,
    ),
    "yolov8_single_agnostic_cxcywh_clipped": (
        ssd_post.PostprocessConfig.from_preset(
            "yolov8", class_agnostic=True, classes=(1, 2, 4), clip_boxes=True, score_thresh=0.1
        ),
        False,
        None,
        False,
    ),
    "per_class_single_label_allow_list": (
        _config(
            score_activation="sigmoid",
            background_class=None,
            label_mode="single",
            classes=(0, 1, 3, 4),
            score_thresh=0.4,
        ),
        True,
        None,
        False,
    ),
    "per_level_single_label_after_selection": (
        _config(
            score_activation="sigmoid",
            background_class=None,
            selection="per_level",
            label_mode="single",
            score_factor_mode="after_selection",
            score_thresh=0.25,
            topk_candidates=30,
        ),
        True,
        LEVELS,
        True,
    ),
}


def mode_inputs(name: str, batch: int, seed: int) -> Dict[str, torch.Tensor]:
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
        if config.score_factor_logits:
            inputs["score_factor"] = torch.randn(batch, anchors_n, 1, generator=generator)
        else:  # a probability (YOLOv5's objectness)
            inputs["score_factor"] = torch.rand(batch, anchors_n, 1, generator=generator)
    return inputs


def mode_module(name: str) -> PostprocessModule:
    config, with_anchors, levels, factor = MODES[name]
    return PostprocessModule(
        mode_anchors() if with_anchors else None, config, levels, factor
    ).eval()


def module_args(module: PostprocessModule, inputs: Dict[str, torch.Tensor]):
    return tuple(inputs[name] for name in module.input_names)


def eager_detections(name: str, inputs: Dict[str, torch.Tensor]) -> ssd_post.Detections:
    config, with_anchors, levels, _ = MODES[name]
    return ssd_post.postprocess(
        inputs["locs"],
        inputs["logits"],
        mode_anchors() if with_anchors else None,
        inputs["image_sizes"] if config.clip_boxes else None,
        config,
        level_sizes=levels,
        score_factor=inputs.get("score_factor"),
    )
