"""ssd_post.non_max_suppression (YOLOv8/11 outputs) against the per-image loop of
ssd_post.reference, plus the two documented differences from ultralytics and bad input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import ssd_post
from ssd_post.reference import yolo_nms_loop
from ssd_post.yolo import cxcywh_to_xyxy

# Probabilities drawn from a few values (ties, values on the thresholds) or uniformly.
TIED_SCORES = torch.tensor([0.0, 0.0005, 0.001, 0.002, 0.25, 0.26, 0.5, 0.7, 0.9])


def make_prediction(
    seed: int, batch: int, nc: int, nm: int, n: int, tied: float = 0.5, sparse: float = 0.7
) -> torch.Tensor:
    """[batch, 4 + nc + nm, n]: boxes on a coarse grid (equal and overlapping boxes),
    class probabilities with ties (``tied``: share drawn from TIED_SCORES) and mostly
    small (``sparse``: share cubed toward 0), any extra columns."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randint(0, 12, (batch, 2, n), generator=g).float() * 8
    size = torch.randint(1, 5, (batch, 2, n), generator=g).float() * 8
    probs = torch.rand(batch, nc, n, generator=g)
    small = torch.rand(batch, nc, n, generator=g) < sparse
    probs = torch.where(small, probs**3 * 0.01, probs)
    tie = torch.rand(batch, nc, n, generator=g) < tied
    probs = torch.where(tie, TIED_SCORES[torch.randint(0, len(TIED_SCORES), probs.shape)], probs)
    extra = torch.randn(batch, nm, n, generator=g)
    return torch.cat((centre, size, probs, extra), dim=1)


def assert_same(prediction: torch.Tensor, **kwargs) -> list:
    """ssd_post equals the oracle, rows and anchor indices, bit for bit."""
    expected, expected_idxs = yolo_nms_loop(prediction, **kwargs)
    actual, actual_idxs = ssd_post.non_max_suppression(prediction, return_idxs=True, **kwargs)
    assert len(actual) == len(expected) == prediction.shape[0]
    for a, e, ai, ei in zip(actual, expected, actual_idxs, expected_idxs):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
        torch.testing.assert_close(ai, ei, rtol=0, atol=0)
    return actual


REGIMES = {
    "validation": dict(conf_thres=0.001, iou_thres=0.7, multi_label=True),
    "prediction": dict(conf_thres=0.25, iou_thres=0.7, multi_label=False),
}


@pytest.mark.parametrize("regime", sorted(REGIMES))
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    nc=st.sampled_from([1, 2, 3, 5, 6, 10, 17, 80]),
    nm=st.integers(0, 3),
    n=st.integers(0, 60),
    tied=st.sampled_from([0.0, 0.5, 0.9]),
    agnostic=st.booleans(),
    max_det=st.sampled_from([1, 3, 300]),
    max_nms=st.sampled_from([1, 5, 30000]),
)
def test_matches_oracle(regime, seed, batch, nc, nm, n, tied, agnostic, max_det, max_nms):
    prediction = make_prediction(seed, batch, nc, nm, n, tied)
    assert_same(
        prediction,
        **REGIMES[regime],
        nc=nc,
        agnostic=agnostic,
        max_det=max_det,
        max_nms=max_nms,
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    conf=st.sampled_from([0.0, 0.001, 0.25, 0.5, 0.9, 1.0]),
    iou=st.sampled_from([0.0, 0.3, 0.45, 0.7, 1.0]),
    multi_label=st.booleans(),
    classes=st.one_of(st.none(), st.lists(st.integers(0, 7), max_size=4)),
)
def test_matches_oracle_any_threshold_and_classes(seed, conf, iou, multi_label, classes):
    prediction = make_prediction(seed, 2, 5, 1, 40)
    assert_same(
        prediction,
        conf_thres=conf,
        iou_thres=iou,
        multi_label=multi_label,
        classes=classes,
        nc=5,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_match_oracle(dtype):
    prediction = make_prediction(5, 2, 7, 2, 50).to(dtype)
    for regime in REGIMES.values():
        output = assert_same(prediction, **regime, nc=7, max_nms=20)
        assert all(rows.dtype == dtype for rows in output)
        assert sum(len(rows) for rows in output) > 0


def test_extra_columns_and_indices_gather_the_right_rows():
    prediction = make_prediction(3, 3, 4, 5, 80)
    output, idxs = ssd_post.non_max_suppression(
        prediction, conf_thres=0.001, iou_thres=0.7, multi_label=True, nc=4, return_idxs=True
    )
    assert sum(len(d) for d in output) > 3
    for image, (rows, anchors) in enumerate(zip(output, idxs)):
        assert rows.shape[1] == 6 + 5 and anchors.dtype == torch.int64
        columns = prediction[image][:, anchors].T  # [n, 4 + nc + nm]
        torch.testing.assert_close(rows[:, :4], cxcywh_to_xyxy(columns[:, :4]), rtol=0, atol=0)
        labels = rows[:, 5].long()
        torch.testing.assert_close(rows[:, 4], columns[torch.arange(len(rows)), 4 + labels])
        torch.testing.assert_close(rows[:, 6:], columns[:, 8:], rtol=0, atol=0)
        # By decreasing confidence.
        assert torch.all(rows[:-1, 4] >= rows[1:, 4])


def test_classes_filter_after_best_class():
    # Anchor 0: best class 1 (0.9), class 0 also passes (0.8); anchor 1: best class 0.
    prediction = torch.zeros(1, 4 + 2, 2)
    prediction[0, :4] = torch.tensor([[10.0, 100.0], [10.0, 100.0], [4.0, 4.0], [4.0, 4.0]])
    prediction[0, 4:] = torch.tensor([[0.8, 0.6], [0.9, 0.1]])
    (best,) = ssd_post.non_max_suppression(prediction, classes=[0])
    assert best[:, 5].tolist() == [0.0] and best[:, 4].tolist() == [pytest.approx(0.6)]
    (multi,) = ssd_post.non_max_suppression(prediction, classes=[0], multi_label=True)
    assert multi[:, 4].tolist() == [pytest.approx(0.8), pytest.approx(0.6)]
    assert_same(prediction, classes=[0])
    assert_same(prediction, classes=[0], multi_label=True)


def test_agnostic_suppresses_across_classes():
    # Two equal boxes, different classes: per class both stay, agnostic keeps one.
    prediction = torch.zeros(1, 4 + 2, 2)
    prediction[0, :4] = torch.tensor([[10.0, 10.0], [10.0, 10.0], [4.0, 4.0], [4.0, 4.0]])
    prediction[0, 4:] = torch.tensor([[0.9, 0.0], [0.0, 0.8]])
    assert len(ssd_post.non_max_suppression(prediction)[0]) == 2
    (kept,) = ssd_post.non_max_suppression(prediction, agnostic=True)
    assert kept[:, 4].tolist() == [pytest.approx(0.9)]


def test_max_nms_smaller_than_candidates_and_max_det():
    prediction = make_prediction(7, 2, 3, 0, 200, tied=0.3, sparse=0.0)
    full = ssd_post.non_max_suppression(prediction, conf_thres=0.0, multi_label=True, nc=3)
    capped = assert_same(prediction, conf_thres=0.0, multi_label=True, nc=3, max_nms=50)
    # 600 candidates an image, 50 go to NMS: fewer survivors than without the cap.
    assert all(len(c) < len(f) for c, f in zip(capped, full))
    few = assert_same(prediction, conf_thres=0.0, multi_label=True, nc=3, max_det=4)
    assert [len(d) for d in few] == [4, 4]
    for f, d in zip(full, few):
        torch.testing.assert_close(d, f[:4], rtol=0, atol=0)


def test_equal_scores_rank_by_anchor_then_class():
    # Documented difference: ultralytics' max_nms cap sorts unstably, so which of equal
    # candidates it keeps is unspecified; here the lower anchor, then the lower class.
    n = 10
    prediction = torch.zeros(1, 4 + 2, n)
    prediction[0, 0] = torch.arange(n) * 100.0  # disjoint boxes: nothing suppressed
    prediction[0, 1] = 10.0
    prediction[0, 2:4] = 4.0
    prediction[0, 4:] = 0.5
    output, idxs = ssd_post.non_max_suppression(
        prediction, multi_label=True, max_nms=5, return_idxs=True
    )
    assert idxs[0].tolist() == [0, 0, 1, 1, 2]
    assert output[0][:, 5].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert_same(prediction, multi_label=True, max_nms=5)
    # Best-class regime: equal class probabilities go to the lower class.
    (best,) = ssd_post.non_max_suppression(prediction, max_det=3)
    assert best[:, 5].tolist() == [0.0, 0.0, 0.0]


def test_exact_where_the_class_offset_rounds():
    # Documented difference: ultralytics adds cls * max_wh to float32 coordinates; for
    # class 79 the offset is 606720, where float32 steps by 1/16 px, so an IoU close
    # to iou_thres can land on the other side. Scan shifts of a 1.2 px box for pairs
    # where the offset NMS and the exact NMS decide differently.
    nc, label, iou_thres = 80, 79, 0.7
    differing = 0
    for step in range(200):
        shift = 0.1 + step * 0.001
        prediction = torch.zeros(1, 4 + nc, 2)
        prediction[0, :4] = torch.tensor(
            [[100.37, 100.37 + shift], [50.0, 50.0], [1.2, 1.2], [1.2, 1.2]]
        )
        prediction[0, 4 + label] = torch.tensor([0.9, 0.8])
        boxes, scores = cxcywh_to_xyxy(prediction[0, :4].T), prediction[0, 4 + label]
        exact = torchvision.ops.nms(boxes, scores, iou_thres)
        offset = torchvision.ops.nms(boxes + label * 7680.0, scores, iou_thres)
        (kept,) = ssd_post.non_max_suppression(prediction, iou_thres=iou_thres)
        assert len(kept) == len(exact)  # the exact decision, whatever the offset does
        differing += len(exact) != len(offset)
    assert differing > 0


def test_no_candidates_and_input_untouched():
    prediction = make_prediction(1, 2, 3, 2, 30)
    before = prediction.clone()
    output, idxs = ssd_post.non_max_suppression(
        [prediction, "raw head outputs"], conf_thres=1.0, nc=3, return_idxs=True
    )
    assert [d.shape for d in output] == [(0, 8), (0, 8)]
    assert all(i.dtype == torch.int64 and i.shape == (0,) for i in idxs)
    ssd_post.non_max_suppression(prediction, conf_thres=0.001, multi_label=True)
    torch.testing.assert_close(prediction, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prediction=torch.zeros(6, 8)), "prediction"),
        (dict(prediction=torch.zeros(1, 6, 8, dtype=torch.int64)), "prediction"),
        (dict(prediction="boxes"), "prediction"),
        (dict(nc=3), "nc"),
        (dict(nc=-1), "nc"),
        (dict(conf_thres=1.5), "conf_thres"),
        (dict(iou_thres=-0.1), "iou_thres"),
        (dict(iou_thres=float("nan")), "iou_thres"),
        (dict(max_det=0), "max_det"),
        (dict(max_nms=2.5), "max_nms"),
        (dict(classes=["person"]), "classes"),
        (dict(classes=3), "classes"),
        (dict(agnostic="yes"), "agnostic"),
        (dict(rotated=True), "rotated"),
        (dict(end2end=True), "end2end"),
        (dict(labels=[torch.zeros(1, 5)]), "labels"),
        (dict(max_wh="big"), "max_wh"),
    ],
)
def test_bad_input(kwargs, match):
    arguments = dict(prediction=torch.zeros(1, 4 + 2, 8))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ssd_post.non_max_suppression(**arguments)


@pytest.mark.parametrize("shape", [(0, 6, 10), (2, 6, 0)])
@pytest.mark.parametrize("multi_label", [False, True])
def test_empty_batch_or_no_anchors(shape, multi_label):
    output, idxs = ssd_post.non_max_suppression(
        torch.rand(shape), conf_thres=0.0, multi_label=multi_label, max_nms=1, return_idxs=True
    )
    assert [d.shape for d in output] == [(0, 6)] * shape[0]
    assert [i.shape for i in idxs] == [(0,)] * shape[0]
