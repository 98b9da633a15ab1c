"""The output-bounded CPU postprocess (csrc/cpu/bounded_nms.*): one scan of each
image's candidates in output order that stops after detections_per_img survivors
must give exactly what the full pipeline gives (decode every candidate, NMS every
class, keep the best), and must not decode the candidates it never reaches."""

from __future__ import annotations

from typing import List, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssd_post
from ssd_post import PostprocessConfig, reference

from common_utils import assert_same_detections, random_boxes

# Logits on a coarse grid: many exact ties between scores, in one row (equal
# logits) and across rows and classes (equal rows), which the output order
# (score, then class, then anchor) must break exactly as the full pipeline does.
_logit = st.integers(-8, 8).map(lambda k: k / 2.0)
_DETECTIONS = [1, 2, 3, 7, 64, 10**9]


def _debug_counters(reset: bool = False) -> List[int]:
    """[boxes decoded, images scanned again] since the last reset."""
    return torch.ops.ssd_post._debug_counters(reset)


@st.composite
def problems(draw, exact_boxes: bool):
    batch = draw(st.integers(1, 3))
    num_anchors = draw(st.integers(1, 40))
    classes = draw(st.integers(1, 6))
    n_logits = batch * num_anchors * classes
    logits = torch.tensor(
        draw(st.lists(_logit, min_size=n_logits, max_size=n_logits)), dtype=torch.float32
    ).reshape(batch, num_anchors, classes)
    shifts = st.integers(-4, 4).map(lambda k: k / 4.0)
    # Nonzero (dw, dh) exercise the chunked exp; 0 makes boxes exact for the oracle.
    scales = st.just(0.0) if exact_boxes else st.integers(-6, 6).map(lambda k: k / 4.0)
    locs = torch.tensor(
        [
            [draw(shifts), draw(shifts), draw(scales), draw(scales)]
            for _ in range(batch * num_anchors)
        ],
        dtype=torch.float32,
    ).reshape(batch, num_anchors, 4)
    corners = []
    for _ in range(num_anchors):
        # A small canvas: many overlapping boxes, so NMS suppresses.
        x, y = draw(st.integers(0, 16)), draw(st.integers(0, 16))
        w, h = draw(st.integers(1, 10)), draw(st.integers(1, 10))
        corners.append([x, y, x + w, y + h])
    anchors = torch.tensor(corners, dtype=torch.float32).reshape(num_anchors, 4)
    image_sizes = [(draw(st.integers(8, 32)), draw(st.integers(8, 32))) for _ in range(batch)]
    background = draw(st.sampled_from([None, 0]))
    config = PostprocessConfig(
        score_thresh=draw(st.sampled_from([0.0, 0.05, 0.2])),
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0])),
        # Small caps make classes run out of candidates before the scan is done.
        topk_candidates=draw(st.sampled_from([1, 2, 5, 1000])),
        detections_per_img=draw(st.sampled_from(_DETECTIONS)),
        score_activation=draw(st.sampled_from(["softmax", "sigmoid"])),
        background_class=background,
        clip_boxes=draw(st.booleans()),
    )
    return locs, logits, anchors, image_sizes, config


def _full_pipeline(
    locs: torch.Tensor,
    logits: torch.Tensor,
    anchors: torch.Tensor,
    image_sizes: List[tuple],
    config: PostprocessConfig,
) -> ssd_post.Detections:
    """Every candidate decoded (decode_threshold_flatten), NMS over every class
    (batched_nms), then the detections_per_img best survivors of each image."""
    batch, num_anchors, classes = logits.shape
    background: Optional[int] = config.resolve_background_class(classes)
    boxes, scores, keys = torch.ops.ssd_post.decode_threshold_flatten(
        locs,
        logits,
        anchors,
        torch.tensor(image_sizes, dtype=torch.float32),
        config.score_thresh,
        config.topk_candidates,
        list(config.box_weights),
        config.score_activation,
        background,
        config.clip_boxes,
    )
    # Survivors by score; equal scores in flat order (image, class, rank).
    keep = torch.ops.ssd_post.batched_nms(boxes, scores, keys, config.nms_thresh)
    k = config.padded_detections(num_anchors, classes)
    out = ssd_post.Detections(
        torch.zeros(batch, k, 4),
        torch.zeros(batch, k),
        torch.zeros(batch, k, dtype=torch.int64),
        torch.zeros(batch, dtype=torch.int64),
    )
    for image in range(batch):
        mine = keep[keys[keep] // classes == image][:k]
        n = mine.numel()
        out.boxes[image, :n] = boxes[mine]
        out.scores[image, :n] = scores[mine]
        out.labels[image, :n] = keys[mine] % classes
        out.num_detections[image] = n
    return out


@pytest.mark.slow  # a few hundred hypothesis examples
@settings(max_examples=300, deadline=None)
@given(problems(exact_boxes=False))
def test_bounded_scan_equals_the_full_pipeline(problem):
    locs, logits, anchors, image_sizes, config = problem
    expected = _full_pipeline(locs, logits, anchors, image_sizes, config)
    actual = ssd_post.postprocess(locs, logits, anchors, image_sizes, config)
    assert_same_detections(actual, expected)


@pytest.mark.slow  # a few hundred hypothesis examples
@settings(max_examples=200, deadline=None)
@given(problems(exact_boxes=True))
def test_bounded_scan_equals_the_oracle(problem):
    locs, logits, anchors, image_sizes, config = problem
    expected = reference.postprocess_loop(locs, logits, anchors, image_sizes, config)
    actual = ssd_post.postprocess(locs, logits, anchors, image_sizes, config)
    if config.score_activation == "sigmoid":
        # torch's vectorised exp and the kernel's std::exp may differ in the last bit.
        torch.testing.assert_close(actual.scores, expected.scores, rtol=1e-6, atol=0)
        actual.scores = expected.scores
    assert_same_detections(actual, expected)


def test_torch_exp_does_not_depend_on_position():
    """The scan exps each chunk's (dw, dh) on its own; the full pipeline exps them
    all at once. That gives the same boxes only because torch's exp gives an
    element the same bits at any offset and in a tensor of any length (the vector
    tail included)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(1000, generator=generator) * 4
    whole = torch.exp(values)
    for start in (0, 1, 3, 7, 13, 100):
        for length in (1, 2, 5, 8, 15, 16, 17, 33, 64, 127):
            part = values[start : start + length].clone().exp_()
            assert torch.equal(part, whole[start : start + length]), (start, length)


def _dense_problem(batch: int, num_anchors: int, classes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_anchors, classes, generator=generator)
    locs = 0.5 * torch.randn(batch, num_anchors, 4, generator=generator)
    anchors = random_boxes(num_anchors, generator, size=300.0)
    return locs, logits, anchors, [(300, 300)] * batch


def test_scan_decodes_only_the_boxes_it_reaches():
    """Thousands of candidates per image, 5 detections asked: the scan must stop
    long before decoding them all (counted by the kernels, not timed)."""
    locs, logits, anchors, sizes = _dense_problem(2, 3000, 8, seed=1)
    config = PostprocessConfig(
        score_thresh=0.01, nms_thresh=0.5, topk_candidates=3000, detections_per_img=5
    )
    _debug_counters(reset=True)
    boxes, _, _ = ssd_post.decode_threshold_flatten(locs, logits, anchors, sizes, config)
    candidates = boxes.shape[0]
    # The counter counts: decoding every candidate shows every candidate.
    assert _debug_counters(reset=True) == [candidates, 0]
    assert candidates > 10_000

    detections = ssd_post.postprocess(locs, logits, anchors, sizes, config)
    decoded, rescans = _debug_counters(reset=True)
    assert detections.num_detections.tolist() == [5, 5]
    assert 10 <= decoded <= candidates // 50
    assert rescans == 0
    assert _debug_counters() == [0, 0]


@pytest.mark.parametrize("threads", [1, 4])
def test_image_scanned_again_when_its_cut_keeps_too_few(threads):
    """Thousands of candidates on one box: NMS keeps one per class, fewer than the
    10 asked, so the scan passes the image cut (the best max(8 K, 512) candidates)
    and must scan the image again without it, and still equal the full pipeline."""
    generator = torch.Generator().manual_seed(3)
    batch, num_anchors, classes = 2, 3000, 4
    logits = torch.randn(batch, num_anchors, classes, generator=generator)
    locs = torch.zeros(batch, num_anchors, 4)
    anchors = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).expand(num_anchors, 4).contiguous()
    sizes = [(100, 100)] * batch
    config = PostprocessConfig(
        score_thresh=0.01, nms_thresh=0.5, topk_candidates=3000, detections_per_img=10
    )
    expected = _full_pipeline(locs, logits, anchors, sizes, config)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _debug_counters(reset=True)
        actual = ssd_post.postprocess(locs, logits, anchors, sizes, config)
        _, rescans = _debug_counters(reset=True)
    finally:
        torch.set_num_threads(saved)
    assert_same_detections(actual, expected)
    assert actual.num_detections.tolist() == [classes - 1] * batch
    assert rescans == batch


@pytest.mark.parametrize("batch", [1, 3])
def test_result_does_not_depend_on_thread_count(batch):
    """B < threads splits each image's anchors across threads; B >= threads runs an
    image per thread: both must give the same bits."""
    locs, logits, anchors, sizes = _dense_problem(batch, 4096, 6, seed=2)
    config = PostprocessConfig(
        score_thresh=0.05, nms_thresh=0.45, topk_candidates=200, detections_per_img=100
    )
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 4):
            torch.set_num_threads(n)
            results.append(ssd_post.postprocess(locs, logits, anchors, sizes, config))
    finally:
        torch.set_num_threads(threads)
    assert_same_detections(results[1], results[0])
    assert results[0].num_detections.tolist() == [100] * batch


@pytest.mark.parametrize("detections", [1, 20, 100])
@pytest.mark.parametrize("nms_thresh", [0.3, 0.7])
def test_image_cut_equals_the_full_pipeline(detections, nms_thresh):
    """Enough candidates for the image cut to act, on a small canvas where NMS
    suppresses many of them: whether the scan ends above the cut or scans again,
    the answer is the full pipeline's."""
    generator = torch.Generator().manual_seed(detections)
    batch, num_anchors, classes = 3, 2000, 5
    logits = (torch.randn(batch, num_anchors, classes, generator=generator) * 2).round() / 2
    locs = 0.3 * torch.randn(batch, num_anchors, 4, generator=generator)
    anchors = random_boxes(num_anchors, generator, size=40.0)
    sizes = [(40, 40)] * batch
    config = PostprocessConfig(
        score_thresh=0.01,
        nms_thresh=nms_thresh,
        topk_candidates=1000,
        detections_per_img=detections,
    )
    expected = _full_pipeline(locs, logits, anchors, sizes, config)
    actual = ssd_post.postprocess(locs, logits, anchors, sizes, config)
    assert_same_detections(actual, expected)


@pytest.mark.parametrize("threads", [1, 4])
def test_class_cut_away_entirely_by_the_image_cut(threads):
    """Class 1 fills the image cut on the first anchors; class 2 scores lower and
    only on later anchors, so the cut drops all of it, and the per-class top-k
    leaves nothing below the cut to show that candidates are missing. NMS keeps one
    box of class 1 (all boxes are equal): running out of candidates short of K must
    count as too few and scan the image again."""
    num_anchors = 3000
    generator = torch.Generator().manual_seed(4)
    logits = torch.full((1, num_anchors, 3), -10.0)
    logits[0, :, 0] = 0.0
    logits[0, :2000, 1] = 6.0 + 0.01 * torch.randn(2000, generator=generator)
    logits[0, 2000:, 2] = 2.0 + 0.01 * torch.randn(num_anchors - 2000, generator=generator)
    locs = torch.zeros(1, num_anchors, 4)
    anchors = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).expand(num_anchors, 4).contiguous()
    # 2 classes x 300 > 512 candidates: the cut is on.
    config = PostprocessConfig(
        score_thresh=0.01, nms_thresh=0.5, topk_candidates=300, detections_per_img=10
    )
    expected = _full_pipeline(locs, logits, anchors, [(300, 300)], config)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _debug_counters(reset=True)
        actual = ssd_post.postprocess(locs, logits, anchors, [(300, 300)], config)
        _, rescans = _debug_counters(reset=True)
    finally:
        torch.set_num_threads(saved)
    assert_same_detections(actual, expected)
    assert actual.labels[0].tolist()[:3] == [1, 2, 0]
    assert actual.num_detections.tolist() == [2]
    assert rescans == 1
