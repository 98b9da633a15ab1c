"""Every bad input gets an error that names the argument, or a documented result."""

from __future__ import annotations

import pytest
import torch

import ssd_post
from ssd_post import PostprocessConfig, reference

B, A, C = 2, 6, 4


def _good():
    generator = torch.Generator().manual_seed(0)
    locs = torch.randn(B, A, 4, generator=generator)
    logits = torch.randn(B, A, C, generator=generator)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * A) + torch.arange(A).view(A, 1)
    return locs, logits, anchors, [(32, 32)] * B


def _call_both(locs, logits, anchors, sizes, config=None):
    ssd_post.postprocess(locs, logits, anchors, sizes, config)
    ssd_post.decode_threshold_flatten(locs, logits, anchors, sizes, config)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "locs": a["locs"][0]}, "locs should be a 3d tensor"),
        (lambda a: {**a, "logits": a["logits"][..., 0]}, "logits should be a 3d tensor"),
        (lambda a: {**a, "locs": a["locs"][..., :3]}, "locs should have 4"),
        (lambda a: {**a, "locs": a["locs"][:1]}, "batch size B"),
        (lambda a: {**a, "locs": a["locs"][:, :5]}, "number of anchors A"),
        (lambda a: {**a, "anchors": a["anchors"][:5]}, "anchors should have shape"),
        (lambda a: {**a, "anchors": a["anchors"][:, :3]}, "anchors should have shape"),
        (lambda a: {**a, "anchors": a["anchors"].expand(3, A, 4)}, "one row of anchors per image"),
        (lambda a: {**a, "anchors": [a["anchors"]]}, "list of B = 2"),
        (lambda a: {**a, "anchors": "boxes"}, "anchors should be a Tensor"),
        (lambda a: {**a, "anchors": a["anchors"].long()}, "anchors should be a floating point"),
        (lambda a: {**a, "sizes": [(32, 32)]}, "image_sizes should be"),
        (lambda a: {**a, "sizes": [(32, 32, 3)] * B}, "image_sizes should be"),
        (lambda a: {**a, "sizes": torch.ones(B, 3)}, "image_sizes should be"),
        (lambda a: {**a, "sizes": [(0, 32)] * B}, "image_sizes should hold positive"),
        (lambda a: {**a, "sizes": [("a", 1)] * B}, "image_sizes should be"),
        (lambda a: {**a, "locs": a["locs"].long()}, "locs should be float32"),
        (lambda a: {**a, "logits": a["logits"].int()}, "logits should be float32"),
        (lambda a: {**a, "logits": a["logits"].double()}, "logits should be float32"),
        (lambda a: {**a, "locs": [1, 2]}, "locs should be a Tensor"),
        (lambda a: {**a, "logits": a["logits"][..., :0]}, "at least one class"),
    ],
)
def test_bad_tensors(change, match):
    locs, logits, anchors, sizes = _good()
    args = change({"locs": locs, "logits": logits, "anchors": anchors, "sizes": sizes})
    with pytest.raises((ValueError, RuntimeError), match=match):
        _call_both(args["locs"], args["logits"], args["anchors"], args["sizes"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"score_thresh": -0.1}, "score_thresh should be in"),
        ({"score_thresh": 1.5}, "score_thresh should be in"),
        ({"score_thresh": float("nan")}, "score_thresh should be in"),
        ({"score_thresh": "0.1"}, "score_thresh should be a float"),
        ({"nms_thresh": 2.0}, "nms_thresh should be in"),
        ({"topk_candidates": 0}, "topk_candidates should be an int >= 1"),
        ({"topk_candidates": 2.5}, "topk_candidates should be an int >= 1"),
        ({"detections_per_img": 0}, "detections_per_img should be an int >= 1"),
        ({"box_weights": (1.0, 1.0, 1.0)}, "box_weights"),
        ({"box_weights": (1.0, 1.0, 0.0, 1.0)}, "box_weights"),
        ({"score_activation": "relu"}, "score_activation"),
        ({"background_class": -1}, "background_class"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostprocessConfig(**kwargs)


def test_background_class_outside_the_logits():
    locs, logits, anchors, sizes = _good()
    with pytest.raises(RuntimeError, match=r"background_class should be in \[0, C\)"):
        _call_both(locs, logits, anchors, sizes, PostprocessConfig(background_class=C))


@pytest.mark.parametrize("op", ["postprocess", "decode_threshold_flatten"])
def test_raw_op_checks_its_scalars(op):
    locs, logits, anchors, _ = _good()
    sizes = torch.full((B, 2), 32)
    common = dict(
        box_weights=[10.0, 10.0, 5.0, 5.0],
        score_activation="softmax",
        background_class=0,
        clip_boxes=True,
    )
    call = getattr(torch.ops.ssd_post, op)
    if op == "postprocess":
        with pytest.raises(RuntimeError, match="detections_per_img should be >= 1"):
            call(locs, logits, anchors, sizes, 0.1, 0.5, 10, 0, **common)
        with pytest.raises(RuntimeError, match="nms_thresh should be in"):
            call(locs, logits, anchors, sizes, 0.1, -1.0, 10, 5, **common)
        with pytest.raises(RuntimeError, match="score_activation should be"):
            call(
                locs, logits, anchors, sizes, 0.1, 0.5, 10, 5, **{**common, "score_activation": "x"}
            )
    else:
        with pytest.raises(RuntimeError, match="topk_candidates should be >= 1"):
            call(locs, logits, anchors, sizes, 0.1, 0, **common)
        with pytest.raises(RuntimeError, match="score_thresh should be in"):
            call(locs, logits, anchors, sizes, 1.1, 10, **common)
        with pytest.raises(RuntimeError, match="box_weights should have 4"):
            call(locs, logits, anchors, sizes, 0.1, 10, **{**common, "box_weights": [1.0]})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_never_become_detections(value):
    locs, logits, anchors, sizes = _good()
    logits[0] = value
    logits[1, :, 1] = 10.0  # image 1 has real detections
    det = ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig(score_thresh=0.1))
    # All-NaN, all-+inf and all--inf rows are NaN after torch's softmax: never kept.
    assert det.num_detections[0] == 0
    assert det.num_detections[1] > 0
    assert torch.isfinite(det.scores).all()


def test_one_nan_logit_drops_its_anchor_only():
    locs, logits, anchors, sizes = _good()
    logits[:] = -5.0
    logits[:, :, 2] = 5.0
    logits[0, 3, 0] = float("nan")  # torch's softmax makes this whole row NaN
    boxes, scores, keys = ssd_post.decode_threshold_flatten(
        locs, logits, anchors, sizes, PostprocessConfig(score_thresh=0.5, clip_boxes=False)
    )
    assert keys.tolist().count(2) == A - 1 and keys.tolist().count(C + 2) == A
    assert not torch.isnan(scores).any()


@pytest.mark.parametrize("batch, anchors_n", [(0, 6), (2, 0), (0, 0)])
def test_empty_batches_and_anchor_sets(batch, anchors_n):
    locs = torch.zeros(batch, anchors_n, 4)
    logits = torch.zeros(batch, anchors_n, C)
    anchors = torch.zeros(anchors_n, 4)
    det = ssd_post.postprocess(
        locs, logits, anchors, [(10, 10)] * batch, PostprocessConfig(detections_per_img=3)
    )
    k = 3 if anchors_n else 0  # K = min(detections_per_img, C_fg * min(topk, A))
    assert det.boxes.shape == (batch, k, 4) and det.num_detections.shape == (batch,)
    assert int(det.num_detections.sum()) == 0
    boxes, scores, keys = ssd_post.decode_threshold_flatten(
        locs, logits, anchors, [(10, 10)] * batch
    )
    assert boxes.shape == (0, 4) and scores.shape == (0,) and keys.dtype == torch.int64
    assert det.to_list() == [] if batch == 0 else len(det.to_list()) == batch


def test_only_background_class_gives_no_detections():
    locs, logits, anchors, sizes = _good()
    det = ssd_post.postprocess(
        locs, logits[..., :1], anchors, sizes, PostprocessConfig(score_thresh=0.0)
    )
    assert det.num_detections.tolist() == [0, 0]


def test_zero_area_and_inverted_anchors_are_decoded_not_rejected():
    locs, logits, anchors, sizes = _good()
    anchors[0] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # zero area: decodes to a point
    anchors[1] = torch.tensor([10.0, 10.0, 0.0, 0.0])  # inverted: decoded as torchvision does
    logits[:] = 0.0
    logits[:, :2, 1] = 10.0
    config = PostprocessConfig(score_thresh=0.5, clip_boxes=False)
    det = ssd_post.postprocess(locs, logits, anchors, sizes, config)
    expected = reference.postprocess_loop(locs, logits, anchors, sizes, config)
    torch.testing.assert_close(det.boxes, expected.boxes, rtol=1e-5, atol=1e-4)
    assert det.num_detections.tolist() == expected.num_detections.tolist() == [2, 2]
