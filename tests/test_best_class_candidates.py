"""ssd_post::best_class_candidates: the anchors whose best class passes a threshold,
capped per image, against reference.best_class_candidates_loop. Three
implementations: the CPU kernel (a max pass, then the class of the anchors that
pass), the composition of best_class and ATen ops that every other device runs
(called on the CPU through _best_class_candidates_composite), and CUDA where there
is a device."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_post import ops, reference

from common_utils import cuda_kernel_param, draw_class_major_scores


def _run(kind: str, scores, thresh, cap, classes=None, boxes=None, box_format="xyxy"):
    if kind == "composite":
        return torch.ops.ssd_post._best_class_candidates_composite(
            scores, thresh, cap, classes, boxes, box_format
        )
    boxes = None if boxes is None else boxes.to(kind)
    return ops.best_class_candidates(scores.to(kind), thresh, cap, classes, boxes, box_format)


KINDS = ("cpu", "composite", cuda_kernel_param("cuda"))


def _assert_matches(
    kind: str, scores, thresh, cap, classes=None, boxes=None, box_format="xyxy"
) -> torch.Tensor:
    got = _run(kind, scores, thresh, cap, classes, boxes, box_format)
    want = reference.best_class_candidates_loop(scores, thresh, cap, classes, boxes, box_format)
    for name, g, w in zip(("anchor", "score", "label", "count", "boxes"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0, equal_nan=True, msg=name)
    return want[3]


def _boxes_of(scores: torch.Tensor, seed: int, dtype=torch.float32) -> torch.Tensor:
    """[B, 4, N] boxes: centres or corners anywhere, sizes with odd low bits (so
    that halving them rounds in float16 and bfloat16), one NaN coordinate."""
    generator = torch.Generator().manual_seed(seed)
    batch, _, anchors = scores.shape
    boxes = (torch.rand(batch, 4, anchors, generator=generator) * 1000 - 100).to(dtype)
    if boxes.numel():
        boxes.view(-1)[boxes.numel() // 3] = float("nan")
    return boxes


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(("cpu", "composite")),
    batch=st.integers(0, 3),
    classes=st.integers(1, 9),
    anchors=st.integers(0, 41),  # several vectors plus a tail, for 4-, 8- and 16-wide
    data=st.data(),
)
def test_matches_the_loop(kind, batch, classes, anchors, data):
    scores = draw_class_major_scores(data, batch, classes, anchors)
    n = scores.numel()
    thresh = data.draw(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 0.875, 1.0]))
    cap = data.draw(st.integers(1, anchors + 2))
    allowed = data.draw(st.none() | st.lists(st.integers(0, classes - 1), max_size=classes))
    boxes = data.draw(st.sampled_from([None, torch.float32, torch.float16, torch.bfloat16]))
    if boxes is not None:
        boxes = _boxes_of(scores, n, boxes)
    box_format = data.draw(st.sampled_from(["xyxy", "cxcywh"]))
    _assert_matches(kind, scores, thresh, cap, allowed, boxes, box_format)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("anchors", [511, 512, 513, 2047, 2048, 2049, 4103])
def test_tile_and_task_edges(kind, anchors):
    # The CPU kernel reads 512-anchor tiles inside 2048-anchor tasks: candidates on
    # both sides of each edge, in the vector body and the tail.
    generator = torch.Generator().manual_seed(anchors)
    scores = torch.rand(2, 7, anchors, generator=generator) * 0.5
    for a in (0, 1, 7, 8, 510, 511, 512, 513, 2046, 2047, 2048, 2049, anchors - 2, anchors - 1):
        if a < anchors:
            scores[:, a % 7, a] = 0.9
    counts = _assert_matches(kind, scores, 0.45, 30000, boxes=_boxes_of(scores, 1))
    assert counts.min() > 0
    # Capped below the count: the best ones, ties among the 0.9s to the lower anchors.
    _assert_matches(kind, scores, 0.45, 5, boxes=_boxes_of(scores, 2), box_format="cxcywh")


@pytest.mark.parametrize("threads", [1, 3])
def test_every_thread_count_gives_the_same_slots(threads):
    generator = torch.Generator().manual_seed(threads)
    scores = torch.rand(5, 11, 4500, generator=generator) ** 8
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_matches("cpu", scores, 0.5, 100)
        _assert_matches("cpu", scores, 0.5, 30000)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_slice_of_a_yolo_output_and_other_dtypes(kind, dtype):
    generator = torch.Generator().manual_seed(0)
    prediction = (torch.rand(3, 4 + 80 + 32, 8400, generator=generator) ** 6 * 0.7).to(dtype)
    prediction[0, 4 + 7, 100] = float("nan")
    prediction[0, 4 + 8, 100] = 0.99  # a NaN score: never a candidate
    prediction[1, 4 + 3, 5:9] = 0.75  # equal best scores: class 3 over 5..
    prediction[1, 4 + 60, 5:9] = 0.75  # .. and class 60: the lower class wins
    prediction[:, :4] = _boxes_of(prediction[:, :4], 3, dtype)
    scores = prediction[:, 4 : 4 + 80]  # a view, anchors contiguous
    counts = _assert_matches(kind, scores, 0.25, 30000, None, prediction[:, :4], "cxcywh")
    assert counts.min() > 0
    anchor, _, label, count, boxes = _run(kind, scores, 0.25, 30000)
    assert boxes.shape == (3, 0, 4)
    row = anchor[1, : count[1]].cpu()
    assert label[1, : count[1]].cpu()[(row >= 5) & (row < 9)].tolist() == [3, 3, 3, 3]
    assert 100 not in anchor[0].tolist()
    _assert_matches(kind, scores, 0.25, 10, [3, 60, 79])


def test_non_contiguous_anchors_are_read_right():
    scores = torch.rand(2, 40, 5, generator=torch.Generator().manual_seed(1)).mT  # [2, 5, 40]
    assert scores.stride(2) != 1
    _assert_matches("cpu", scores, 0.5, 7)
    _assert_matches("composite", scores, 0.5, 7)


@pytest.mark.parametrize("kind", ("cpu", "composite"))
def test_signed_zeros_and_negative_thresholds(kind):
    # -0.0 and +0.0 are equal scores: the cap keeps the lower anchor.
    scores = torch.tensor([[[-0.0, 0.0, 0.0, -0.0, -1.0]]])
    _assert_matches(kind, scores, -0.5, 2)
    _assert_matches(kind, scores, -2.0, 3)


@pytest.mark.parametrize("kind", ("cpu", "composite"))
def test_the_width_is_the_fullest_images_count(kind):
    # Nothing passes, no image at all, no anchor: no slot. Then 3 and 1 candidates
    # (cap 2): two slots, the second image's second one empty.
    for shape in ((2, 3, 9), (0, 3, 5), (2, 3, 0)):
        boxes = torch.zeros(shape[0], 4, shape[2])
        anchor, score, label, count, out = _run(kind, torch.zeros(shape), 0.1, 4, None, boxes)
        assert anchor.shape == score.shape == label.shape == (shape[0], 0)
        assert out.shape == (shape[0], 0, 4)
        assert count.tolist() == [0] * shape[0]
    scores = torch.zeros(2, 3, 9)
    scores[0, 1, [2, 4, 6]] = torch.tensor([0.5, 0.7, 0.6])
    scores[1, 2, 8] = 0.9
    anchor, score, label, count, _ = _run(kind, scores, 0.1, 2)
    assert anchor.tolist() == [[4, 6], [8, -1]]
    assert score.tolist() == [[0.699999988079071, 0.6000000238418579], [0.8999999761581421, 0.0]]
    assert label.tolist() == [[1, 1], [2, -1]] and count.tolist() == [2, 1]


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 3), 0.1, 5), r"3d tensor \[B, C, N\] with C >= 1, got shape \[2, 3\]"),
        ((torch.zeros(2, 3, 4, dtype=torch.int64), 0.1, 5), "float32, float16 or bfloat16"),
        ((torch.zeros(2, 3, 4), float("nan"), 5), "score_thresh should be a number, got nan"),
        ((torch.zeros(2, 3, 4), "0.1", 5), "score_thresh should be a number, got '0.1'"),
        ((torch.zeros(2, 3, 4), 0.1, 0), "max_candidates should be an int >= 1, got 0"),
        ((torch.zeros(2, 3, 4), 0.1, 2.0), "max_candidates should be an int >= 1, got 2.0"),
        ((torch.zeros(2, 3, 4), 0.1, 5, [0, 3]), r"classes should be columns in \[0, C\)"),
        (([1.0], 0.1, 5), "scores should be a Tensor, got list"),
        (
            (torch.zeros(2, 3, 4), 0.1, 5, None, torch.zeros(2, 4, 5)),
            r"boxes should be \[B, 4, N\]",
        ),
        (
            (torch.zeros(2, 3, 4), 0.1, 5, None, torch.zeros(2, 4, 4), "xywh"),
            "box_format should be",
        ),
        ((torch.zeros(2, 3, 4), 0.1, 5, None, [1.0]), "boxes should be a Tensor, got list"),
    ],
)
def test_bad_input_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        ops.best_class_candidates(*args)


def test_the_raw_ops_check_their_scalars():
    scores = torch.zeros(2, 3, 4)
    for op in (
        torch.ops.ssd_post.best_class_candidates,
        torch.ops.ssd_post._best_class_candidates_composite,
    ):
        with pytest.raises(ValueError, match="max_candidates should be >= 1, got -3"):
            op(scores, 0.1, -3)
        with pytest.raises(ValueError, match="score_thresh should be a number"):
            op(scores, float("nan"), 3)


@pytest.mark.parametrize("device", [cuda_kernel_param()])
def test_no_host_synchronization_on_cuda(device):
    scores = torch.rand(4, 80, 8400, device=device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.best_class_candidates(scores, 0.5, 30000)
        ops.best_class_candidates(scores, 0.5, 100, [1, 2, 3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
