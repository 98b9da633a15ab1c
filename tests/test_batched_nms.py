"""ssd_post.batched_nms against torchvision.ops.batched_nms and the oracle."""

from __future__ import annotations

import warnings

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


# --- max_kept: the full NMS truncated, per group or per image ------------------------


@st.composite
def bounded_nms_problems(draw):
    boxes, scores, idxs, thr = draw(nms_problems())
    max_kept = draw(st.integers(0, 6))
    keys_per_image = draw(st.sampled_from([None, 1, 2, 3]))
    return boxes, scores, idxs, thr, max_kept, keys_per_image


@settings(max_examples=200, deadline=None)
@given(bounded_nms_problems())
def test_max_kept_is_the_full_nms_truncated(problem):
    boxes, scores, idxs, thr, max_kept, keys_per_image = problem
    expected = batched_nms_reference(boxes, scores, idxs, thr, max_kept, keys_per_image)
    actual = ssd_post.batched_nms(
        boxes, scores, idxs, thr, max_kept=max_kept, keys_per_image=keys_per_image
    )
    assert actual.tolist() == expected.tolist()


def _clustered(n: int, groups: int, seed: int):
    """Boxes crowded into a small area, so that most are suppressed and a bounded
    scan has to rank several chunks of candidates; scores with many ties."""
    generator = torch.Generator().manual_seed(seed)
    boxes = random_boxes(n, generator, size=60.0)
    scores = torch.round(torch.rand(n, generator=generator) * 30) / 30
    idxs = torch.randint(0, groups, (n,), generator=generator)
    return boxes, scores, idxs


@pytest.mark.parametrize("max_kept", [1, 7, 100, 400, 5000])
@pytest.mark.parametrize("groups, keys_per_image", [(1, None), (12, None), (12, 4), (12, 12)])
def test_max_kept_over_many_chunks(max_kept, groups, keys_per_image):
    boxes, scores, idxs = _clustered(6000, groups, seed=max_kept + groups)
    full = ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    expected = batched_nms_reference(boxes, scores, idxs, 0.5, max_kept, keys_per_image)
    actual = ssd_post.batched_nms(
        boxes, scores, idxs, 0.5, max_kept=max_kept, keys_per_image=keys_per_image
    )
    assert actual.tolist() == expected.tolist()
    # The limit binds where it is small and the full answer is a prefix-subset of it.
    assert set(actual.tolist()) <= set(full.tolist())
    if max_kept == 5000:
        assert actual.tolist() == full.tolist()
    if max_kept == 1 and keys_per_image is None:
        assert len(actual) == len(torch.unique(idxs))


def test_max_kept_per_image_counts_every_group_of_the_image():
    # Image 0 has classes 0 and 1 (keys 0, 1), image 1 has key 2: keys_per_image 2.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    idxs = torch.tensor([0, 0, 1, 1, 2, 2])
    assert ssd_post.batched_nms(boxes, scores, idxs, 0.5, max_kept=3).tolist() == [0, 1, 2, 3, 4, 5]
    per_image = ssd_post.batched_nms(boxes, scores, idxs, 0.5, max_kept=3, keys_per_image=2)
    assert per_image.tolist() == [0, 1, 2, 4, 5]
    per_group = ssd_post.batched_nms(boxes, scores, idxs, 0.5, max_kept=1)
    assert per_group.tolist() == [0, 2, 4]


def test_max_kept_with_nan_scores_and_boxes():
    boxes, scores, idxs = _clustered(500, 3, seed=5)
    scores = scores.double()
    scores[::9] = float("nan")
    scores[4::13] = -0.0
    boxes[7::11, 2] = float("nan")
    for keys_per_image in (None, 2):
        expected = batched_nms_reference(boxes, scores, idxs, 0.4, 20, keys_per_image)
        actual = ssd_post.batched_nms(
            boxes, scores, idxs, 0.4, max_kept=20, keys_per_image=keys_per_image
        )
        assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_kept": -1}, "max_kept should be an int >= 0, got -1"),
        ({"max_kept": 2.5}, "max_kept should be an int >= 0, got 2.5"),
        ({"max_kept": True}, "max_kept should be an int >= 0, got True"),
        ({"max_kept": 5, "keys_per_image": 0}, "keys_per_image should be an int >= 1, got 0"),
        ({"keys_per_image": 3}, "keys_per_image .* needs max_kept; got keys_per_image = 3"),
    ],
)
def test_bad_max_kept_and_keys_per_image(kwargs, match):
    boxes, scores, idxs = _clustered(10, 2, seed=0)
    with pytest.raises(ValueError, match=match):
        ssd_post.batched_nms(boxes, scores, idxs, 0.5, **kwargs)


@pytest.mark.parametrize(
    "max_kept, keys_per_image, match",
    [
        (-3, None, r"max_kept should be >= 0 \(or None for no limit\), got -3"),
        (2, 0, "keys_per_image should be >= 1, got 0"),
        (None, 4, "keys_per_image .* needs max_kept; got keys_per_image = 4"),
    ],
)
def test_the_op_refuses_bad_limits_with_a_value_error(max_kept, keys_per_image, match):
    boxes, scores, idxs = _clustered(10, 2, seed=0)
    with pytest.raises(ValueError, match=match):
        torch.ops.ssd_post.batched_nms(boxes, scores, idxs, 0.5, max_kept, keys_per_image)


# --- TorchScript (detectron2's test_nms_scriptability) ------------------------------


@pytest.fixture(scope="module")
def scripted_batched_nms():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(ssd_post.batched_nms)


@pytest.mark.parametrize("iou_threshold", [0.2, 0.5, 0.8])
def test_scripted_equals_eager(scripted_batched_nms, iou_threshold):
    generator = torch.Generator().manual_seed(int(iou_threshold * 10))
    boxes = random_boxes(1000, generator)
    scores = torch.rand(1000, generator=generator)
    idxs = torch.randint(0, 10, (1000,), generator=generator)
    eager = ssd_post.batched_nms(boxes, scores, idxs, iou_threshold)
    scripted = scripted_batched_nms(boxes, scores, idxs, iou_threshold)
    torch.testing.assert_close(scripted, eager, rtol=0, atol=0)
    assert 0 < len(eager) < 1000
    for max_kept, keys_per_image in ((5, None), (12, 5), (0, None)):
        eager = ssd_post.batched_nms(
            boxes, scores, idxs, iou_threshold, max_kept=max_kept, keys_per_image=keys_per_image
        )
        scripted = scripted_batched_nms(
            boxes, scores, idxs, iou_threshold, max_kept=max_kept, keys_per_image=keys_per_image
        )
        torch.testing.assert_close(scripted, eager, rtol=0, atol=0)
    sorted_ = scripted_batched_nms(boxes[:, [2, 3, 0, 1]], scores, idxs, iou_threshold, "sort")
    torch.testing.assert_close(sorted_, ssd_post.batched_nms(boxes, scores, idxs, iou_threshold))


def test_scripted_keeps_the_checks(scripted_batched_nms):
    boxes, scores, idxs = _clustered(10, 2, seed=0)
    # A raise in scripted Python surfaces as torch.jit.Error and an error of the op
    # as RuntimeError, each with the eager message (docs/torchscript.md).
    with pytest.raises(torch.jit.Error, match="scores should be on the same device as boxes"):
        scripted_batched_nms(boxes, scores.to("meta"), idxs, 0.5)
    with pytest.raises(torch.jit.Error, match="inverted_boxes should be one of"):
        scripted_batched_nms(boxes, scores, idxs, 0.5, "swap")
    inverted = boxes.clone()
    inverted[3] = inverted[3, [2, 3, 0, 1]]
    with pytest.raises(torch.jit.Error, match=r"boxes should have x1 <= x2 .* at index 3"):
        scripted_batched_nms(inverted, scores, idxs, 0.5, "raise")
    with pytest.raises(RuntimeError, match="iou_threshold should be in"):
        scripted_batched_nms(boxes, scores, idxs, 1.5)
    with pytest.raises(RuntimeError, match="max_kept should be >= 0"):
        scripted_batched_nms(boxes, scores, idxs, 0.5, max_kept=-1)
