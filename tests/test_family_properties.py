"""Property tests of the per-level modes (RetinaNet, FCOS) against the readable
oracle ssd_post.reference.postprocess_loop, plus their input checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssd_post
from ssd_post import PostprocessConfig, reference

from common_utils import assert_same_detections, cpu_and_cuda
from cuda_parity import assert_postprocess_match, make_inputs

# Logits on a grid of 1/4: equal logits give exact ties, which the tie rules
# (equal scores by level, then flattened index) must order the same way.
_logit = st.integers(-16, 16).map(lambda k: k / 4.0)
_special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def problems(draw):
    batch = draw(st.integers(0, 3))
    level_sizes = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    anchors_n, classes = sum(level_sizes), draw(st.integers(1, 4))
    n_logits = batch * anchors_n * classes
    values = draw(st.lists(_logit, min_size=n_logits, max_size=n_logits))
    if n_logits and draw(st.booleans()):
        values[draw(st.integers(0, n_logits - 1))] = draw(_special)
    logits = torch.tensor(values, dtype=torch.float32).reshape(batch, anchors_n, classes)
    centerness = torch.tensor(
        draw(st.lists(_logit, min_size=batch * anchors_n, max_size=batch * anchors_n)),
        dtype=torch.float32,
    ).reshape(batch, anchors_n)
    coder = draw(st.sampled_from(["box", "linear"]))
    steps = st.integers(-8, 8).map(lambda k: k / 4.0)
    locs = torch.tensor(
        [[draw(steps) for _ in range(4)] for _ in range(batch * anchors_n)], dtype=torch.float32
    ).reshape(batch, anchors_n, 4)
    if coder == "linear":
        locs = locs.abs()  # FCOS regresses distances (ReLU output)
    anchors = []
    for _ in range(anchors_n):
        x, y, w, h = (
            draw(st.integers(0, 30)),
            draw(st.integers(0, 30)),
            draw(st.integers(1, 16)),
            draw(st.integers(1, 16)),
        )
        anchors.append([x, y, x + w, y + h])
    anchors = torch.tensor(anchors, dtype=torch.float32).reshape(anchors_n, 4)
    image_sizes = [(draw(st.integers(8, 48)), draw(st.integers(8, 48))) for _ in range(batch)]
    activation = draw(st.sampled_from(["sigmoid", "sigmoid_centerness"]))
    config = PostprocessConfig(
        score_thresh=draw(st.sampled_from([0.0, 0.2, 0.5, 0.9])),
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])),
        topk_candidates=draw(st.integers(1, 8)),
        detections_per_img=draw(st.integers(1, 10)),
        box_weights=(1.0, 1.0, 1.0, 1.0),
        score_activation=activation,
        background_class=draw(st.sampled_from([None, "first", "last", 0])),
        selection="per_level",
        box_coder=coder,
    )
    return (
        locs,
        logits,
        anchors,
        image_sizes,
        config,
        level_sizes,
        (centerness if activation == "sigmoid_centerness" else None),
    )


@settings(max_examples=150, deadline=None, derandomize=True)
@given(problems())
def test_per_level_matches_oracle(problem):
    locs, logits, anchors, sizes, config, level_sizes, centerness = problem
    actual = ssd_post.postprocess(
        locs, logits, anchors, sizes, config, level_sizes=level_sizes, centerness=centerness
    )
    expected = reference.postprocess_loop(
        locs, logits, anchors, sizes, config, level_sizes=level_sizes, centerness=centerness
    )
    assert_same_detections(actual, expected)
    background = config.resolve_background_class(logits.shape[2])
    for i, n in enumerate(actual.num_detections.tolist()):
        assert background not in actual.labels[i, :n].tolist()
        assert (actual.scores[i, :n] > config.score_thresh).all()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", ["saturated", "nan_rows"])
@pytest.mark.parametrize("activation", ["sigmoid", "sigmoid_centerness"])
def test_topk_logit_bound_cuts_nothing_of_the_top_k(batch, case, activation):
    # A dense sigmoid head prunes with a logit bound taken from the k-th largest
    # anchor max. sigmoid(x) is exactly 1.0 in float32 from about x = 17, so logits
    # 17 and 50 tie at 1.0: cutting at the k-th logit would drop tied pairs and
    # change which one the flattened-index rule keeps. A NaN row must not count as
    # one of the k either.
    gen = torch.Generator().manual_seed(batch)
    num_anchors, classes = 3000, 5
    logits = torch.randn(batch, num_anchors, classes, generator=gen) * 2 - 1  # most pairs pass 0.05
    saturated = torch.tensor([17.0, 18.0, 20.0, 30.0, 50.0, float("inf")])
    where = torch.randint(0, num_anchors * classes, (batch, 60), generator=gen)
    if case == "saturated":
        logits.view(batch, -1).scatter_(
            1, where, saturated[torch.randint(0, 6, (batch, 60), generator=gen)]
        )
        logits[0, 11, :] = float("nan")
    else:  # rows of NaN with the largest maxes would otherwise take k-th places
        logits[:, :6, :] = float("nan")
    xy = torch.rand(num_anchors, 2, generator=gen) * 500
    anchors = torch.cat((xy, xy + 20), dim=1)
    locs = torch.zeros(batch, num_anchors, 4)
    centerness = None
    if activation == "sigmoid_centerness":
        # FCOS: the anchor's centerness scales every pair's score; some saturate too.
        centerness = torch.randn(batch, num_anchors, generator=gen) * 3
        centerness[:, 100:110] = 40.0
        centerness[:, 200] = float("nan")
    config = PostprocessConfig(
        score_thresh=0.05,
        nms_thresh=0.5,
        topk_candidates=12,
        detections_per_img=40,
        box_weights=(1.0, 1.0, 1.0, 1.0),
        score_activation=activation,
        background_class=None,
        selection="per_level",
    )
    args = (locs, logits, anchors, [(600, 600)] * batch, config)
    extra = dict(level_sizes=[2000, 1000], centerness=centerness)
    actual = ssd_post.postprocess(*args, **extra)
    assert_same_detections(actual, reference.postprocess_loop(*args, **extra))
    assert (actual.num_detections > 0).all()
    if case == "saturated" and activation == "sigmoid":
        assert (actual.scores[:, 0] == 1.0).all(), "the saturated pairs should lead"


def test_topk_is_per_level_not_per_class():
    # Two levels of one anchor, one class each passing: topk_candidates=1 keeps the
    # best pair of each level (two detections), not the best pair per class.
    logits = torch.tensor([[[3.0, 2.0], [1.0, 4.0]]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    config = PostprocessConfig(
        score_thresh=0.5,
        topk_candidates=1,
        score_activation="sigmoid",
        background_class=None,
        selection="per_level",
        box_weights=(1, 1, 1, 1),
    )
    out = ssd_post.postprocess(
        torch.zeros(1, 2, 4), logits, boxes, [(100, 100)], config, level_sizes=[1, 1]
    )
    assert out.num_detections.tolist() == [2]
    assert out.labels[0, :2].tolist() == [1, 0]
    torch.testing.assert_close(
        out.scores[0, :2], torch.sigmoid(torch.tensor([4.0, 3.0])), rtol=0, atol=0
    )


def test_background_names_resolve():
    config = PostprocessConfig(background_class="last", score_activation="sigmoid")
    assert config.resolve_background_class(81) == 80
    assert PostprocessConfig(background_class="first").resolve_background_class(81) == 0
    with pytest.raises(ValueError, match="background_class should be"):
        PostprocessConfig(background_class="middle")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"selection": "per_anchor"}, "selection should be one of"),
        ({"box_coder": "delta"}, "box_coder should be one of"),
        ({"score_activation": "tanh"}, "score_activation should be one of"),
        ({"score_factor_mode": "half"}, "score_factor_mode should be one of"),
        ({"score_factor_logits": 1}, "score_factor_logits should be a bool"),
        ({"label_mode": "best"}, "label_mode should be one of"),
        ({"class_agnostic": "yes"}, "class_agnostic should be a bool"),
        ({"classes": ()}, "classes should list at least one class column"),
        ({"classes": (1, 1)}, "classes should not repeat a column"),
        ({"classes": (0,)}, "classes should not hold the background column 0"),
        (
            {"box_format": "cxcywh"},
            "box_format is the layout of decoded boxes, for box_coder='none'",
        ),
        ({"box_coder": "none", "box_format": "xywh"}, "box_format should be one of"),
    ],
)
def test_bad_config(fields, match):
    with pytest.raises(ValueError, match=match):
        PostprocessConfig(**fields)


def _inputs(batch=2, anchors_n=6, classes=3):
    generator = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(anchors_n, 1)
    return (
        torch.randn(batch, anchors_n, 4, generator=generator),
        torch.randn(batch, anchors_n, classes, generator=generator),
        boxes,
        [(20, 20)] * batch,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, r"level_sizes should be given"),
        ({"level_sizes": [2, 3]}, r"summing to A = 6, got \[2, 3\]"),
        ({"level_sizes": [7, -1]}, r"ints >= 0"),
        ({"level_sizes": torch.ones(2, 3, dtype=torch.int64)}, r"1d integer tensor, got 2D"),
        ({"level_sizes": "abc"}, r"list of ints"),
        (
            {"level_sizes": [6], "centerness": torch.zeros(2, 6)},
            r"centerness is only used with a config.score_factor_mode",
        ),
    ],
)
def test_bad_per_level_arguments(kwargs, match):
    config = PostprocessConfig(
        score_activation="sigmoid", selection="per_level", background_class=None
    )
    with pytest.raises(ValueError, match=match):
        ssd_post.postprocess(*_inputs(), config, **kwargs)


@pytest.mark.parametrize(
    "centerness, match",
    [
        (None, r"score_factor should be a Tensor"),
        (
            torch.zeros(2, 5),
            r"centerness should be \[B, A\] or \[B, A, 1\] = \[2, 6\(, 1\)\], got \(2, 5\)",
        ),
        (torch.zeros(2, 6, 2), r"got \(2, 6, 2\)"),
        (torch.zeros(2, 6, dtype=torch.int64), r"float32, float16 or bfloat16"),
    ],
)
def test_bad_centerness(centerness, match):
    config = PostprocessConfig(
        score_activation="sigmoid",
        score_factor_mode="sqrt",
        selection="per_level",
        background_class=None,
        box_coder="linear",
    )
    with pytest.raises(ValueError, match=match):
        ssd_post.postprocess(*_inputs(), config, level_sizes=[6], centerness=centerness)


def test_level_sizes_for_per_class_is_an_error():
    with pytest.raises(ValueError, match="level_sizes is only used by selection='per_level'"):
        ssd_post.postprocess(*_inputs(), PostprocessConfig(), level_sizes=[6])


def test_level_sizes_tensor_and_centerness_2d_or_3d_agree():
    config = PostprocessConfig(
        score_activation="sigmoid",
        score_factor_mode="sqrt",
        selection="per_level",
        background_class=None,
        box_coder="linear",
        score_thresh=0.1,
    )
    locs, logits, boxes, sizes = _inputs()
    centerness = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    a = ssd_post.postprocess(
        locs.abs(), logits, boxes, sizes, config, level_sizes=[4, 2], centerness=centerness
    )
    b = ssd_post.postprocess(
        locs.abs(),
        logits,
        boxes,
        sizes,
        config,
        level_sizes=torch.tensor([4, 2]),
        centerness=centerness.unsqueeze(-1),
    )
    assert a.num_detections.sum() > 0
    assert_same_detections(a, b)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("activation", ["sigmoid", "sigmoid_centerness"])
def test_per_level_runs_on_the_device_of_its_inputs(device, activation):
    """Every device has the per-level modes (on CUDA the select_per_level kernel, or
    the batched torch ops in a build without it): the detections come back on the
    device of the inputs and match the CPU oracle (CUDA scores within the rounding
    of the device's expf, cuda_parity.py)."""
    fcos = activation == "sigmoid_centerness"
    config = PostprocessConfig(
        score_thresh=0.3,
        detections_per_img=40,
        score_activation=activation,
        selection="per_level",
        background_class=None,
        box_coder="linear" if fcos else "box",
    )
    locs, logits, anchors, sizes = make_inputs(2, 300, 4, seed=3, logit_scale=2.0)
    if fcos:
        locs = locs.abs() * 20  # FCOS regresses distances (ReLU output)
    centerness = torch.randn(2, 300, generator=torch.Generator().manual_seed(4)) if fcos else None
    extra = dict(level_sizes=[200, 100])
    actual = ssd_post.postprocess(
        locs.to(device),
        logits.to(device),
        anchors,  # CPU anchors and sizes are constants on any device
        sizes,
        config,
        centerness=None if centerness is None else centerness.to(device),
        **extra,
    )
    fields = (actual.boxes, actual.scores, actual.labels, actual.num_detections)
    assert {t.device.type for t in fields} == {device}
    expected = reference.postprocess_loop(
        locs, logits, anchors, sizes, config, centerness=centerness, **extra
    )
    assert expected.num_detections.min() > 0
    assert_postprocess_match(
        (expected.boxes, expected.scores, expected.labels, expected.num_detections), fields
    )


def test_old_centerness_spelling_is_the_sqrt_factor():
    old = PostprocessConfig(score_activation="sigmoid_centerness", selection="per_level")
    assert (old.score_activation, old.score_factor_mode) == ("sigmoid", "sqrt")
    assert old == PostprocessConfig(
        score_activation="sigmoid", score_factor_mode="sqrt", selection="per_level"
    )


def test_anchor_and_size_arguments_follow_the_config():
    locs, logits, boxes, sizes = _inputs()
    decoded = PostprocessConfig(box_coder="none", background_class=None, score_activation="sigmoid")
    with pytest.raises(ValueError, match="anchors should be None with box_coder='none'"):
        ssd_post.postprocess(locs, logits, boxes, sizes, decoded)
    with pytest.raises(ValueError, match="anchors should be given for box_coder='box', got None"):
        ssd_post.postprocess(locs, logits, None, sizes, PostprocessConfig())
    with pytest.raises(ValueError, match="image_sizes should be given when config.clip_boxes"):
        ssd_post.postprocess(locs, logits, boxes, None, PostprocessConfig())
    # Not clipping: no sizes needed, on the fused op and the family alike.
    not_clipping = PostprocessConfig(
        box_coder="none", background_class=None, score_activation="sigmoid", clip_boxes=False
    )
    for config in (PostprocessConfig(clip_boxes=False), not_clipping):
        anchors = None if config.box_coder == "none" else boxes
        out = ssd_post.postprocess(locs, logits, anchors, None, config)
        assert out.num_detections.shape == (2,)


def test_score_factor_and_its_old_name_are_not_both_given():
    config = PostprocessConfig(
        score_activation="sigmoid",
        score_factor_mode="sqrt",
        selection="per_level",
        background_class=None,
    )
    factor = torch.zeros(2, 6)
    with pytest.raises(ValueError, match="give score_factor or its old name centerness, not both"):
        ssd_post.postprocess(
            *_inputs(), config, level_sizes=[6], score_factor=factor, centerness=factor
        )


def test_decode_threshold_flatten_is_the_ssd_first_stage_only():
    with pytest.raises(ValueError, match="decode_threshold_flatten is SSD's per-class first stage"):
        ssd_post.decode_threshold_flatten(
            *_inputs(), PostprocessConfig(score_activation="sigmoid", label_mode="single")
        )
    locs, logits, boxes, _ = _inputs()
    with pytest.raises(ValueError, match="image_sizes should be given to decode_threshold_flatten"):
        ssd_post.decode_threshold_flatten(locs, logits, boxes, None)
