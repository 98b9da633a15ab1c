"""ssd_post::best_class: each anchor's best class of class-major scores [B, C, N],
against torch.max over the classes (the value; the lowest class at equal scores;
NaN when any score is NaN), on every vector width's body and tail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_post import ops

from common_utils import cpu_and_cuda, draw_class_major_scores


def _expected(scores: torch.Tensor):
    """torch's answer: max over the classes; the first maximum's class (argmax
    returns the first); NaN where any score is NaN."""
    values = scores.float()
    best, _ = values.max(1)
    nan_free = torch.where(values.isnan(), float("-inf"), values)
    label = nan_free.argmax(1)
    return best, label


def _assert_matches(scores: torch.Tensor) -> None:
    best, label = ops.best_class(scores)
    want_best, want_label = _expected(scores.cpu())
    assert best.dtype == torch.float32 and label.dtype == torch.int64
    torch.testing.assert_close(best.cpu(), want_best, rtol=0, atol=0, equal_nan=True)
    rows = ~want_best.isnan()  # a NaN anchor's class is not defined
    assert torch.equal(label.cpu()[rows], want_label[rows])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    batch=st.integers(0, 3),
    classes=st.integers(1, 12),
    anchors=st.integers(0, 41),  # several vectors plus a tail, for 4-, 8- and 16-wide
    data=st.data(),
)
def test_matches_torch_max(batch, classes, anchors, data):
    _assert_matches(draw_class_major_scores(data, batch, classes, anchors))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_slice_of_a_yolo_output_and_other_dtypes(device, dtype):
    generator = torch.Generator().manual_seed(0)
    prediction = torch.rand(3, 4 + 80 + 32, 8400, generator=generator).to(dtype)
    prediction[0, 4 + 7, 100] = float("nan")
    prediction[1, 4 + 3, 5:9] = 2.0  # equal best scores: class 3 over 5..
    prediction[1, 4 + 60, 5:9] = 2.0  # .. and class 60: the lower class wins
    scores = prediction.to(device)[:, 4 : 4 + 80]  # a view, anchors contiguous
    _assert_matches(scores)
    best, label = ops.best_class(scores)
    assert best[0, 100].isnan()
    assert label[1, 5:9].tolist() == [3, 3, 3, 3]


def test_non_contiguous_anchors_are_read_right():
    scores = torch.rand(2, 40, 5, generator=torch.Generator().manual_seed(1)).mT  # [2, 5, 40]
    assert scores.stride(2) != 1
    _assert_matches(scores)


@pytest.mark.parametrize(
    "scores, match",
    [
        (torch.zeros(2, 3), r"3d tensor \[B, C, N\] with C >= 1, got shape \[2, 3\]"),
        (torch.zeros(2, 0, 3), r"with C >= 1, got shape \[2, 0, 3\]"),
        (torch.zeros(2, 3, 4, dtype=torch.int64), "float32, float16 or bfloat16, got Long"),
        (torch.zeros(2, 3, 4, dtype=torch.float64), "float32, float16 or bfloat16, got Double"),
    ],
)
def test_bad_input_is_named(scores, match):
    with pytest.raises(ValueError, match=match):
        ops.best_class(scores)
    with pytest.raises(ValueError, match="scores should be a Tensor, got list"):
        ops.best_class([1.0])
