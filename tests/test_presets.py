"""The named presets: each runs through postprocess with the tensors its docstring
describes and gives the oracle's detections; the threshold helper and the errors."""

from __future__ import annotations

import pytest
import torch

import ssd_post
from ssd_post import PostprocessConfig, reference
from ssd_post.presets import at_least, preset_names

from common_utils import assert_same_detections, needs_cuda

BATCH, LEVELS, CLASSES = 2, [48, 12, 4], 5
ANCHORS = sum(LEVELS)


def _grid_anchors(generator):
    xy = torch.rand(ANCHORS, 2, generator=generator) * 200
    side = torch.rand(ANCHORS, 1, generator=generator) * 40 + 8
    return torch.cat((xy, xy + side), dim=1)


def _inputs(name, generator):
    """(positional args, keyword args) of postprocess for preset ``name``, with
    scores spread so that every preset keeps some detections and drops others."""
    config = PostprocessConfig.from_preset(name)
    if config.box_coder == "none":  # YOLO: probabilities, decoded cxcywh boxes
        centre = torch.rand(BATCH, ANCHORS, 2, generator=generator) * 200
        size = torch.rand(BATCH, ANCHORS, 2, generator=generator) * 40 + 4
        locs = torch.cat((centre, size), dim=2)
        logits = torch.rand(BATCH, ANCHORS, CLASSES, generator=generator) ** 3
        anchors = sizes = None
    else:
        locs = torch.randn(BATCH, ANCHORS, 4, generator=generator) * 0.5
        if config.box_coder == "linear":
            locs = locs.abs()
        logits = torch.randn(BATCH, ANCHORS, CLASSES, generator=generator) * 2 - 2
        anchors, sizes = _grid_anchors(generator), [(240, 240)] * BATCH
    kwargs = {}
    if config.selection == "per_level":
        kwargs["level_sizes"] = LEVELS
    if config.score_factor_mode is not None:
        factor = torch.randn(BATCH, ANCHORS, generator=generator)
        kwargs["score_factor"] = factor if config.score_factor_logits else factor.sigmoid()
    return config, (locs, logits, anchors, sizes, config), kwargs


@pytest.mark.parametrize("name", preset_names())
def test_preset_matches_the_oracle(name):
    config, args, kwargs = _inputs(name, torch.Generator().manual_seed(len(name)))
    actual = ssd_post.postprocess(*args, **kwargs)
    expected = reference.postprocess_loop(*args, **kwargs)
    assert_same_detections(actual, expected)
    assert (actual.num_detections > 0).all(), "the inputs should keep detections"
    assert actual.anchor_indices is not None
    kept = actual.anchor_indices >= 0
    assert kept.sum(1).tolist() == actual.num_detections.tolist()


def test_at_least_turns_greater_equal_into_greater():
    t = at_least(0.01)
    exact = torch.tensor(0.01, dtype=torch.float32)
    below = torch.nextafter(exact, torch.tensor(0.0))
    assert torch.tensor(t, dtype=torch.float32) == below
    assert bool(exact > t) and not bool(below > t)


def test_yolox_keeps_a_score_equal_to_its_threshold():
    # One anchor whose objectness x class probability is exactly the threshold:
    # YOLOX's test is >=, so it is kept (the strict test drops it).
    logits = torch.tensor([[[0.25, 0.0]]])
    factor = torch.tensor([[0.04]])
    threshold = float(logits[0, 0, 0] * factor[0, 0])  # a float32 value
    boxes = torch.tensor([[[50.0, 50.0, 10.0, 10.0]]])
    kept = ssd_post.postprocess(
        boxes,
        logits,
        config=PostprocessConfig.from_preset("yolox", score_thresh=at_least(threshold)),
        score_factor=factor,
    )
    strict = ssd_post.postprocess(
        boxes,
        logits,
        config=PostprocessConfig.from_preset("yolox", score_thresh=threshold),
        score_factor=factor,
    )
    assert kept.num_detections.tolist() == [1] and strict.num_detections.tolist() == [0]
    assert kept.boxes[0, 0].tolist() == [45.0, 45.0, 55.0, 55.0]


def test_presets_take_overrides_and_refuse_unknown_names():
    config = PostprocessConfig.from_preset("yolov8", score_thresh=0.001, label_mode="multi")
    assert (config.score_thresh, config.label_mode) == (0.001, "multi")
    with pytest.raises(ValueError, match="preset should be one of"):
        PostprocessConfig.from_preset("yolov3")
    with pytest.raises(
        ValueError, match=r"overrides should be PostprocessConfig fields, got \['conf'\]"
    ):
        PostprocessConfig.from_preset("yolov8", conf=0.1)
    with pytest.raises(ValueError, match="score_thresh"):
        PostprocessConfig.from_preset("yolov8", score_thresh=2.0)


@needs_cuda
@pytest.mark.parametrize("name", preset_names())
def test_preset_postprocess_does_not_synchronize_on_cuda(name):
    """Every preset's pipeline (select_topk, decode, batched_nms_padded) on CUDA
    never waits for the host, and gives the CPU oracle's detections (scores within
    the device's rounding)."""
    config, args, kwargs = _inputs(name, torch.Generator().manual_seed(len(name)))
    locs, logits, anchors, sizes, _ = args

    def cuda(t):
        return None if t is None else t.cuda()

    sizes_t = None if sizes is None else torch.tensor(sizes).cuda()
    kw = {k: (cuda(v) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        det = ssd_post.postprocess(cuda(locs), cuda(logits), cuda(anchors), sizes_t, config, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = reference.postprocess_loop(*args, **kwargs)
    assert det.num_detections.cpu().tolist() == expected.num_detections.tolist()
    torch.testing.assert_close(det.scores.cpu(), expected.scores, rtol=1e-5, atol=1e-6)
