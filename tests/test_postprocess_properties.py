"""Property tests: every op against the readable oracle in ssd_post.reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssd_post
from ssd_post import PostprocessConfig, reference

from common_utils import assert_same_detections

# Logits on a grid of 1/4: distinct logits give probabilities far apart compared to
# float rounding, so both implementations agree on every comparison; equal logits
# give exact ties, which the tie rules must order.
_logit = st.integers(-24, 24).map(lambda k: k / 4.0)
_special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def problems(draw, exact_boxes: bool):
    batch = draw(st.integers(0, 3))
    anchors_n = draw(st.integers(0, 12))
    classes = draw(st.integers(1, 5))
    n_logits = batch * anchors_n * classes
    values = draw(st.lists(_logit, min_size=n_logits, max_size=n_logits))
    if n_logits and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            values[draw(st.integers(0, n_logits - 1))] = draw(_special)
    logits = torch.tensor(values, dtype=torch.float32).reshape(batch, anchors_n, classes)
    # dw = dh = 0 makes exp(.) exactly 1, so boxes are bit-identical and NMS
    # decisions cannot differ by exp rounding; other decode paths are tested apart.
    shifts = st.integers(-8, 8).map(lambda k: k / 2.0)
    scales = st.just(0.0) if exact_boxes else st.integers(-10, 10).map(lambda k: k / 2.0)
    locs = torch.tensor(
        [
            [draw(shifts), draw(shifts), draw(scales), draw(scales)]
            for _ in range(batch * anchors_n)
        ],
        dtype=torch.float32,
    ).reshape(batch, anchors_n, 4)
    anchors = []
    for _ in range(anchors_n):
        x, y = draw(st.integers(0, 30)), draw(st.integers(0, 30))
        w, h = draw(st.integers(1, 16)), draw(st.integers(1, 16))
        anchors.append([x, y, x + w, y + h])
    anchors = torch.tensor(anchors, dtype=torch.float32).reshape(anchors_n, 4)
    if draw(st.booleans()) and batch:
        anchors = anchors.expand(batch, anchors_n, 4) + torch.arange(batch).view(batch, 1, 1)
    image_sizes = [(draw(st.integers(8, 48)), draw(st.integers(8, 48))) for _ in range(batch)]
    activation = draw(st.sampled_from(["softmax", "sigmoid"]))
    background = draw(st.sampled_from([None] + list(range(classes))))
    config = PostprocessConfig(
        score_thresh=draw(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.5, 0.9, 1.0])),
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.45, 0.5, 1.0])),
        topk_candidates=draw(st.integers(1, 8)),
        detections_per_img=draw(st.integers(1, 8)),
        score_activation=activation,
        background_class=background,
        clip_boxes=draw(st.booleans()),
    )
    return locs, logits, anchors, image_sizes, config


@settings(max_examples=200, deadline=None)
@given(problems(exact_boxes=True))
def test_postprocess_matches_the_oracle(problem):
    locs, logits, anchors, image_sizes, config = problem
    expected = reference.postprocess_loop(locs, logits, anchors, image_sizes, config)
    actual = ssd_post.postprocess(locs, logits, anchors, image_sizes, config)
    if config.score_activation == "sigmoid":
        # torch's vectorised exp and the kernel's std::exp may differ in the last bit.
        torch.testing.assert_close(actual.scores, expected.scores, rtol=1e-6, atol=0)
        actual.scores = expected.scores
    assert_same_detections(actual, expected, box_atol=0.0)
    batch, num_anchors, num_classes = logits.shape
    k = config.padded_detections(
        num_anchors, num_classes
    )  # min(detections_per_img, C_fg * min(topk, A))
    assert actual.boxes.shape == (batch, k, 4) and actual.labels.dtype == torch.int64
    # Padding rows are zero and every reported label is a foreground class.
    for i, n in enumerate(actual.num_detections.tolist()):
        assert torch.all(actual.scores[i, n:] == 0) and torch.all(actual.boxes[i, n:] == 0)
        assert config.background_class not in actual.labels[i, :n].tolist()


def _oracle_candidates(locs, logits, anchors, image_sizes, config):
    """(key, score, box) of every candidate the oracle sends to NMS, in key order."""
    big = PostprocessConfig(**{**config.__dict__, "nms_thresh": 1.0, "detections_per_img": 10**6})
    rows = []
    batch, _, classes = logits.shape
    dets = reference.postprocess_loop(locs, logits, anchors, image_sizes, big)
    for i, det in enumerate(dets.to_list()):
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            rows.append((i * classes + int(label), float(score), box))
    rows.sort(key=lambda r: (r[0], -r[1]))
    return rows


@settings(max_examples=150, deadline=None)
@given(problems(exact_boxes=False))
def test_decode_threshold_flatten_matches_the_oracle(problem):
    locs, logits, anchors, image_sizes, config = problem
    boxes, scores, keys = ssd_post.decode_threshold_flatten(
        locs, logits, anchors, image_sizes, config
    )
    expected = _oracle_candidates(locs, logits, anchors, image_sizes, config)
    assert keys.tolist() == [r[0] for r in expected]
    if expected:
        torch.testing.assert_close(
            scores, torch.tensor([r[1] for r in expected]), rtol=1e-6, atol=0
        )
        torch.testing.assert_close(
            boxes, torch.stack([r[2] for r in expected]), rtol=1e-5, atol=1e-4
        )
    # Keys ascend, scores descend inside a key, at most topk per key.
    if len(keys):
        assert torch.all(keys[1:] >= keys[:-1])
        same = keys[1:] == keys[:-1]
        assert torch.all(scores[1:][same] <= scores[:-1][same])
        assert torch.bincount(keys).max() <= config.topk_candidates


def test_result_does_not_depend_on_thread_count(ssd300_anchors):
    generator = torch.Generator().manual_seed(5)
    locs = torch.randn(3, 8732, 4, generator=generator)
    logits = torch.randn(3, 8732, 91, generator=generator) * 2
    config = PostprocessConfig(score_thresh=0.05)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ssd_post.postprocess(locs, logits, ssd300_anchors, [(300, 300)] * 3, config)
    finally:
        torch.set_num_threads(threads)
    multi = ssd_post.postprocess(locs, logits, ssd300_anchors, [(300, 300)] * 3, config)
    assert single.num_detections.sum() > 0
    assert_same_detections(multi, single, box_atol=0.0)


def test_half_and_bfloat16_inputs_are_computed_in_float32(ssd300_anchors):
    generator = torch.Generator().manual_seed(6)
    locs = torch.randn(2, 8732, 4, generator=generator)
    logits = torch.randn(2, 8732, 91, generator=generator) * 2
    config = PostprocessConfig(score_thresh=0.1)
    for dtype in (torch.float16, torch.bfloat16):
        low_locs, low_logits = locs.to(dtype), logits.to(dtype)
        expected = reference.postprocess_loop(
            low_locs.float(), low_logits.float(), ssd300_anchors, [(300, 300)] * 2, config
        )
        actual = ssd_post.postprocess(
            low_locs, low_logits, ssd300_anchors, [(300, 300)] * 2, config
        )
        assert actual.boxes.dtype == torch.float32 and expected.num_detections.sum() > 0
        assert_same_detections(actual, expected)


def test_wild_regressions_are_clamped_like_torchvision(ssd300_anchors):
    locs = torch.full((1, 8732, 4), 1e4)
    logits = torch.zeros(1, 8732, 3)
    logits[0, :5, 1] = 10.0
    config = PostprocessConfig(score_thresh=0.5, clip_boxes=False)
    expected = reference.postprocess_loop(locs, logits, ssd300_anchors, [(300, 300)], config)
    actual = ssd_post.postprocess(locs, logits, ssd300_anchors, [(300, 300)], config)
    assert torch.isfinite(actual.boxes).all()
    assert_same_detections(actual, expected, box_atol=1e-2)


def test_nan_regressions_give_nan_boxes_not_a_crash():
    locs = torch.full((1, 4, 4), float("nan"))
    logits = torch.tensor([[[0.0, 5.0]] * 4])
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4)
    det = ssd_post.postprocess(
        locs, logits, anchors, [(20, 20)], PostprocessConfig(score_thresh=0.5)
    )
    # NaN boxes overlap nothing, so NMS keeps all four.
    assert det.num_detections.tolist() == [4]
    assert torch.isnan(det.boxes[0, :4]).all()
