"""Every selection mode x every knob of the single-stage family, through
``ssd_post.postprocess`` (the compiled ops) against the oracle
``reference.postprocess_loop``, bit for bit: activation, score factor (mode, logits
or probabilities), label mode, class-agnostic NMS, class allow-list, box coder and
box format, background column; plus scores placed within one ULP and within 1% of
``score_thresh`` on both sides."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssd_post
from ssd_post import PostprocessConfig, reference

from common_utils import assert_same_detections

# Values on a grid of 1/4: equal values give exact ties, whose order the tie rules
# (score, then group, then flattened index) must fix the same way on both sides.
_quarter = st.integers(-16, 16).map(lambda k: k / 4.0)
_special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def _near(threshold: float, draw) -> float:
    """A probability within one ULP or within 1% of ``threshold``, either side."""
    t = torch.tensor(threshold, dtype=torch.float32)
    how = draw(st.sampled_from(["ulp_below", "equal", "ulp_above", "pct_below", "pct_above"]))
    if how == "ulp_below":
        return float(torch.nextafter(t, torch.tensor(-1.0)))
    if how == "ulp_above":
        return float(torch.nextafter(t, torch.tensor(2.0)))
    if how == "equal":
        return float(t)
    return min(1.0, threshold * (0.99 if how == "pct_below" else 1.01))


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-7)
    return math.log(p) - math.log1p(-p)


@st.composite
def family_problems(draw, near_threshold: bool = False):
    selection = draw(st.sampled_from(["per_class", "per_level", "per_image"]))
    activation = draw(st.sampled_from(["softmax", "sigmoid", "none"]))
    factor_mode = draw(st.sampled_from([None, "sqrt", "before_threshold", "after_selection"]))
    factor_logits = draw(st.booleans())
    coder = draw(st.sampled_from(["box", "linear", "none"]))
    batch = draw(st.integers(0 if not near_threshold else 1, 3))
    level_sizes = (
        draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
        if selection == "per_level"
        else [draw(st.integers(0, 8))]
    )
    anchors_n, classes = sum(level_sizes), draw(st.integers(1, 4))
    background = draw(st.sampled_from([None, "first", "last"])) if classes > 1 else None
    score_thresh = draw(st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9]))
    if near_threshold and score_thresh == 0.0:
        score_thresh = 0.3
    n_scores = batch * anchors_n * classes

    # Scores: logits (softmax, sigmoid) or probabilities (none).
    if near_threshold:
        probs = [_near(score_thresh, draw) for _ in range(n_scores)]
        if activation == "none":
            values = probs
        else:  # the logit whose sigmoid is near the threshold (softmax: near it too)
            values = [_logit(p) for p in probs]
    elif activation == "none":
        values = [draw(st.integers(0, 8)) / 8.0 for _ in range(n_scores)]
    else:
        values = draw(st.lists(_quarter, min_size=n_scores, max_size=n_scores))
        if n_scores and draw(st.booleans()):
            values[draw(st.integers(0, n_scores - 1))] = draw(_special)
    logits = torch.tensor(values, dtype=torch.float32).reshape(batch, anchors_n, classes)

    factor = None
    if factor_mode is not None:
        if factor_logits:
            raw = [draw(_quarter) for _ in range(batch * anchors_n)]
            if near_threshold:
                raw = [40.0 if draw(st.booleans()) else r for r in raw]  # sigmoid 1.0
        else:
            raw = [draw(st.integers(0, 8)) / 8.0 for _ in range(batch * anchors_n)]
            if near_threshold:
                raw = [1.0 if draw(st.booleans()) else r for r in raw]
        factor = torch.tensor(raw, dtype=torch.float32).reshape(batch, anchors_n)

    steps = st.integers(-8, 8).map(lambda k: k / 4.0)
    anchor_rows = []
    for _ in range(anchors_n):
        x, y = draw(st.integers(0, 30)), draw(st.integers(0, 30))
        w, h = draw(st.integers(1, 16)), draw(st.integers(1, 16))
        anchor_rows.append([x, y, x + w, y + h])
    anchors = torch.tensor(anchor_rows, dtype=torch.float32).reshape(anchors_n, 4)
    if coder == "none":
        # Decoded boxes: centres and sizes (cxcywh) or corners (xyxy) on a grid.
        locs = anchors.repeat(batch, 1, 1) + torch.tensor(
            [[draw(steps) for _ in range(4)] for _ in range(batch * anchors_n)],
            dtype=torch.float32,
        ).reshape(batch, anchors_n, 4)
        anchors = None
    else:
        locs = torch.tensor(
            [[draw(steps) for _ in range(4)] for _ in range(batch * anchors_n)],
            dtype=torch.float32,
        ).reshape(batch, anchors_n, 4)
        if coder == "linear":
            locs = locs.abs()

    class_columns = [
        c for c in range(classes) if c != {None: -1, "first": 0}.get(background, classes - 1)
    ]
    allow = None
    if class_columns and draw(st.booleans()):
        allow = tuple(sorted(draw(st.sets(st.sampled_from(class_columns), min_size=1))))
    clip = draw(st.booleans())
    config = PostprocessConfig(
        score_thresh=score_thresh,
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])),
        topk_candidates=draw(st.integers(1, 8)),
        detections_per_img=draw(st.integers(1, 10)),
        box_weights=(1.0, 1.0, 1.0, 1.0),
        score_activation=activation,
        score_factor_mode=factor_mode,
        score_factor_logits=factor_logits,
        label_mode=draw(st.sampled_from(["multi", "single"])),
        class_agnostic=draw(st.booleans()),
        classes=allow,
        background_class=background,
        clip_boxes=clip,
        selection=selection,
        box_coder=coder,
        box_format=draw(st.sampled_from(["xyxy", "cxcywh"])) if coder == "none" else "xyxy",
    )
    sizes = (
        [(draw(st.integers(8, 48)), draw(st.integers(8, 48))) for _ in range(batch)]
        if clip
        else None
    )
    kwargs = dict(score_factor=factor)
    if selection == "per_level":
        kwargs["level_sizes"] = level_sizes
    return (locs, logits, anchors, sizes, config), kwargs


def _check(problem):
    args, kwargs = problem
    actual = ssd_post.postprocess(*args, **kwargs)
    expected = reference.postprocess_loop(*args, **kwargs)
    assert_same_detections(actual, expected)
    config, logits = args[4], args[1]
    assert actual.anchor_indices is not None
    for i, n in enumerate(actual.num_detections.tolist()):
        labels = actual.labels[i, :n]
        if config.classes is not None:
            assert set(labels.tolist()) <= set(config.classes)
        if config.label_mode == "single":
            anchors = actual.anchor_indices[i, :n].tolist()
            assert len(set(anchors)) == len(anchors), "one label per anchor"
        assert (actual.anchor_indices[i, :n] < logits.shape[1]).all()
        assert (actual.anchor_indices[i, n:] == -1).all()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(family_problems())
def test_every_mode_and_knob_matches_the_oracle(problem):
    _check(problem)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(family_problems(near_threshold=True))
def test_scores_at_the_threshold_match_the_oracle(problem):
    _check(problem)
