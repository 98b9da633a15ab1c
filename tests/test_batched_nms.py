"""ssd_post.batched_nms against torchvision.ops.batched_nms and the oracle."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import ssd_post
from ssd_post.reference import batched_nms_reference

from common_utils import random_boxes


def _shifted_pairs(
    n: int, iou_threshold: float, eps: float, generator: torch.Generator
) -> torch.Tensor:
    """Pairs of equal-size squares shifted along x so that their IoU is
    iou_threshold + eps or iou_threshold - eps (alternating): just past the threshold
    on either side. IoU of two s-squares shifted by d is (s - d) / (s + d)."""
    side = 20.0
    boxes = []
    for k in range(n):
        target = iou_threshold + (eps if k % 2 == 0 else -eps)
        shift = side * (1 - target) / (1 + target)
        x, y = (torch.rand(2, generator=generator) * 500).tolist()
        boxes.append([x, y, x + side, y + side])
        boxes.append([x + shift, y, x + shift + side, y + side])
    return torch.tensor(boxes)


@pytest.mark.parametrize("iou_threshold", [0.3, 0.45, 0.5, 0.7])
@pytest.mark.parametrize("num_classes", [1, 3, 91])
def test_matches_torchvision_just_past_threshold(iou_threshold, num_classes):
    generator = torch.Generator().manual_seed(int(iou_threshold * 100) + num_classes)
    boxes = _shifted_pairs(200, iou_threshold, 1e-3, generator)
    scores = torch.rand(len(boxes), generator=generator)
    idxs = torch.randint(0, num_classes, (len(boxes),), generator=generator)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    actual = ssd_post.batched_nms(boxes, scores, idxs, iou_threshold)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # The pairs really sit on both sides of the threshold: some pairs survive whole.
    assert 0 < len(actual) < len(boxes)


@pytest.mark.parametrize("n", [5, 300, 3000])
def test_matches_torchvision_random(n):
    generator = torch.Generator().manual_seed(n)
    boxes = random_boxes(n, generator)
    scores = torch.rand(n, generator=generator)
    idxs = torch.randint(0, 7, (n,), generator=generator)
    for thr in (0.0, 0.45, 1.0):
        expected = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
        torch.testing.assert_close(ssd_post.batched_nms(boxes, scores, idxs, thr), expected)


def test_duplicates_and_ties_keep_the_lowest_index():
    box = [10.0, 10.0, 50.0, 50.0]
    boxes = torch.tensor([box, box, box, [100.0, 100.0, 120.0, 120.0], box])
    scores = torch.tensor([0.5, 0.9, 0.9, 0.9, 0.9])
    idxs = torch.zeros(5, dtype=torch.int64)
    keep = ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    # Index 1 wins over 2 and 4 (same score, lower index); 3 is elsewhere; 0 suppressed.
    assert keep.tolist() == [1, 3]


def test_groups_never_suppress_each_other():
    box = [0.0, 0.0, 10.0, 10.0]
    boxes = torch.tensor([box] * 4)
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4])
    idxs = torch.tensor([5, -3, 10**12, 5])
    keep = ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    assert keep.tolist() == [3, 2, 1]


def test_huge_coordinates_and_idx_values_need_no_offsets():
    # The coordinate-offset trick loses precision for big coordinates and idx values.
    boxes = torch.tensor([[1e6, 1e6, 1e6 + 10, 1e6 + 10], [1e6 + 1, 1e6, 1e6 + 11, 1e6 + 10]])
    scores = torch.tensor([0.9, 0.8])
    keep = ssd_post.batched_nms(boxes, scores, torch.tensor([2**40, 2**40]), 0.5)
    assert keep.tolist() == [0]


def test_zero_area_and_inverted_boxes_suppress_nothing():
    boxes = torch.tensor(
        [[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 0.0, 0.0]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep = ssd_post.batched_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.1)
    expected = torchvision.ops.nms(boxes, scores, 0.1)
    assert keep.tolist() == expected.tolist() == [0, 1, 2, 3]


def test_nan_scores_rank_first_like_torch_sort():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, float("nan"), 0.1])
    keep = ssd_post.batched_nms(boxes, scores, torch.zeros(3, dtype=torch.int64), 0.5)
    assert (
        keep.tolist()
        == torchvision.ops.batched_nms(
            boxes, scores, torch.zeros(3, dtype=torch.int64), 0.5
        ).tolist()
    )
    assert keep.tolist() == [1, 2]


def test_empty_input():
    keep = ssd_post.batched_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5
    )
    assert keep.dtype == torch.int64 and keep.shape == (0,)


def test_float64_and_float16_inputs():
    generator = torch.Generator().manual_seed(3)
    boxes = random_boxes(100, generator)
    scores = torch.rand(100, generator=generator)
    idxs = torch.randint(0, 3, (100,), generator=generator)
    expected = ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    torch.testing.assert_close(
        ssd_post.batched_nms(boxes.double(), scores.double(), idxs, 0.5), expected
    )
    assert ssd_post.batched_nms(boxes.half(), scores.half(), idxs.int(), 0.5).dtype == torch.int64


@pytest.mark.parametrize(
    "boxes, scores, idxs, thr, match",
    [
        (
            torch.zeros(3, 4, 1),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.int64),
            0.5,
            "boxes should be a 2d tensor",
        ),
        (torch.zeros(3, 5), torch.zeros(3), torch.zeros(3, dtype=torch.int64), 0.5, "4 elements"),
        (torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.int64), 0.5, "same length"),
        (
            torch.zeros(3, 4),
            torch.zeros(3, 1),
            torch.zeros(3, dtype=torch.int64),
            0.5,
            "scores should be a 1d",
        ),
        (torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), 0.5, "idxs should be an integer"),
        (
            torch.zeros(3, 4, dtype=torch.int64),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.int64),
            0.5,
            "boxes should be a floating",
        ),
        (
            torch.zeros(3, 4),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.int64),
            1.5,
            "iou_threshold should be in",
        ),
        (
            torch.zeros(3, 4),
            torch.zeros(3),
            torch.zeros(3, dtype=torch.int64),
            float("nan"),
            "iou_threshold should be in",
        ),
    ],
)
def test_bad_input_names_the_argument(boxes, scores, idxs, thr, match):
    # The Python wrapper checks scalars (ValueError), the op checks tensors (RuntimeError).
    with pytest.raises((ValueError, RuntimeError), match=match):
        ssd_post.batched_nms(boxes, scores, idxs, thr)


_coords = st.integers(0, 40).map(float)


@st.composite
def nms_problems(draw):
    n = draw(st.integers(0, 40))
    boxes = []
    for _ in range(n):
        x1, y1 = draw(_coords), draw(_coords)
        w, h = draw(st.integers(0, 20)), draw(st.integers(0, 20))
        boxes.append([x1, y1, x1 + w, y1 + h])
    # Few distinct scores: many ties, which the index order must break.
    scores = draw(st.lists(st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]), min_size=n, max_size=n))
    idxs = draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n))
    thr = draw(st.sampled_from([0.0, 0.2, 0.45, 0.5, 0.8, 1.0]))
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores).reshape(-1),
        torch.tensor(idxs, dtype=torch.int64).reshape(-1),
        thr,
    )


@settings(max_examples=150, deadline=None)
@given(nms_problems())
def test_matches_the_oracle(problem):
    boxes, scores, idxs, thr = problem
    expected = batched_nms_reference(boxes, scores, idxs, thr)
    assert ssd_post.batched_nms(boxes, scores, idxs, thr).tolist() == expected.tolist()


def test_result_does_not_depend_on_thread_count():
    generator = torch.Generator().manual_seed(9)
    boxes = random_boxes(2000, generator)
    scores = torch.rand(2000, generator=generator)
    idxs = torch.randint(0, 50, (2000,), generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(
        ssd_post.batched_nms(boxes, scores, idxs, 0.5), single, rtol=0, atol=0
    )
