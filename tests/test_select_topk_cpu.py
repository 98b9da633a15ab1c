"""The CPU kernel of ``ssd_post::select_topk`` (csrc/cpu/select_per_level.cpp) for every
scoring rule, bit for bit against the oracle ``reference.select_topk_loop``: each
activation x factor mode x factor form x label mode x allow-list x grouping (per
level, per image, per class), in float32 / float16 / bfloat16, with exact ties, NaN,
scores within one float step and within 1% of the threshold, blocks across the
grain of torch's loop at several thread counts, and the whole-block fallback."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_post import ops, reference

ROOT = Path(__file__).resolve().parents[1]

ACTIVATIONS = ["softmax", "sigmoid", "none"]
FACTOR_MODES = [None, "sqrt", "before_threshold", "after_selection"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _select(logits, factor, level_sizes, thresh, topk, background, **rule):
    """The op and the oracle on the same arguments; asserts the three outputs equal."""
    args = (logits, factor, level_sizes, thresh, topk, background)
    got = ops.select_topk_op(*args, **rule)
    want = reference.select_topk_loop(*args, **rule)
    for name, g, w in zip(("flat", "scores", "counts"), got, want):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        # Exact equality, NaN equal to NaN ("after_selection" reports p * NaN).
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"{name} differs")
    return want


def _rule(activation, mode, factor_logits, single_label, classes, per_class):
    return dict(
        score_activation=activation,
        factor_mode=mode or "sqrt",
        factor_logits=factor_logits,
        single_label=single_label,
        classes=classes,
        per_class=per_class,
    )


# Values on a grid of 1/4 (logits) or 1/8 (probabilities): equal values give exact
# ties, between pairs (ranked by flat index) and between the columns of a row
# (single_label takes the lower one).
_logit_values = st.integers(-24, 24).map(lambda k: k / 4.0)
_probability_values = st.integers(0, 8).map(lambda k: k / 8.0)
_special = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def rules_and_inputs(draw):
    activation = draw(st.sampled_from(ACTIVATIONS))
    mode = draw(st.sampled_from(FACTOR_MODES))
    factor_logits = draw(st.booleans())
    single_label = draw(st.booleans())
    grouping = draw(st.sampled_from(["per_level", "per_image", "per_class"]))
    dtype = draw(st.sampled_from(DTYPES))
    batch, classes = draw(st.integers(1, 2)), draw(st.integers(1, 6))
    if grouping == "per_level":
        level_sizes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=3))
    else:
        level_sizes = [draw(st.integers(0, 20))]
    anchors = sum(level_sizes)
    n = batch * anchors * classes
    values = _probability_values if activation == "none" else _logit_values
    logits = torch.tensor(draw(st.lists(values, min_size=n, max_size=n)), dtype=torch.float32)
    if n and draw(st.booleans()):
        logits[draw(st.integers(0, n - 1))] = draw(_special)
    logits = logits.reshape(batch, anchors, classes).to(dtype)
    if draw(st.booleans()):  # a strided view: scored whole, as the oracle's slices are
        logits = logits.transpose(0, 1).contiguous().transpose(0, 1)
    factor = None
    if mode is not None:
        values = _logit_values if factor_logits else _probability_values
        m = batch * anchors
        factor = torch.tensor(draw(st.lists(values, min_size=m, max_size=m)), dtype=torch.float32)
        if m and draw(st.booleans()):
            factor[draw(st.integers(0, m - 1))] = float("nan")
        shape = (batch, anchors) if draw(st.booleans()) else (batch, anchors, 1)
        factor = factor.reshape(shape).to(draw(st.sampled_from([dtype, torch.float32])))
    background = draw(st.sampled_from([None, 0, classes - 1]))
    allow = None
    if draw(st.booleans()):
        columns = [c for c in range(classes) if c != background]
        allow = draw(st.lists(st.sampled_from(columns), unique=True)) if columns else None
    rule = _rule(activation, mode, factor_logits, single_label, allow, grouping == "per_class")
    thresh = draw(st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.75, 0.99, 1.0]))
    topk = draw(st.sampled_from([1, 2, 3, 5, 1000]))
    return logits, factor, level_sizes, thresh, topk, background, rule


@settings(max_examples=250, deadline=None, derandomize=True, database=None)
@given(problem=rules_and_inputs())
def test_every_rule_equals_the_oracle(problem):
    logits, factor, level_sizes, thresh, topk, background, rule = problem
    _select(logits, factor, level_sizes, thresh, topk, background, **rule)


# Every combination once, on a block with ties and pairs on both sides of the
# threshold: hypothesis above samples the space, this covers each corner.
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("mode", FACTOR_MODES)
@pytest.mark.parametrize("factor_logits", [True, False])
@pytest.mark.parametrize("single_label", [False, True])
@pytest.mark.parametrize("grouping", ["per_level", "per_image", "per_class"])
def test_each_combination_equals_the_oracle(
    activation, mode, factor_logits, single_label, grouping
):
    if mode is None and not factor_logits:
        pytest.skip("no factor: factor_logits has no effect")
    gen = torch.Generator().manual_seed(11)
    batch, classes, level_sizes = 2, 7, [40, 13, 0, 6]
    if grouping != "per_level":
        level_sizes = [sum(level_sizes)]
    anchors = sum(level_sizes)
    logits = torch.randint(-12, 12, (batch, anchors, classes), generator=gen) / 4.0
    if activation == "none":
        logits = torch.randint(0, 9, (batch, anchors, classes), generator=gen) / 8.0
    factor = None
    if mode is not None:
        factor = torch.randint(-8, 9, (batch, anchors), generator=gen) / 4.0
        if not factor_logits:
            factor = torch.rand(batch, anchors, 1, generator=gen)
    rule = _rule(activation, mode, factor_logits, single_label, None, grouping == "per_class")
    for dtype in DTYPES:
        for thresh, topk, background, allow in [
            (0.2, 1000, None, None),
            (0.05, 4, 0, [1, 3, 6]),
            (0.5, 2, 6, [0, 2]),
        ]:
            rule["classes"] = allow
            typed = None if factor is None else factor.to(dtype)
            _select(logits.to(dtype), typed, level_sizes, thresh, topk, background, **rule)


def _next_float(value: torch.Tensor, steps: int) -> torch.Tensor:
    toward = torch.tensor(math.inf if steps > 0 else -math.inf)
    for _ in range(abs(steps)):
        value = torch.nextafter(value, toward)
    return value


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def _class_inputs(activation: str, probs: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits [n, classes] whose column-0 probability is about probs [n] (float64) and
    whose other foreground columns cannot pass; the last column is the background,
    which takes the rest of each softmax row (the others are 40 below it)."""
    n = probs.numel()
    logits = torch.full((n, classes), -40.0, dtype=torch.float64)
    if activation == "sigmoid":
        logits[:, 0] = torch.tensor([_logit(float(p)) if p < 1 else 40.0 for p in probs])
    elif activation == "softmax":
        logits[:, 0] = probs.log()
        logits[:, -1] = (1 - probs).clamp_min(1e-300).log()
        logits[probs >= 1, -1] = -math.inf
    else:
        logits[:, 0] = probs
        logits[:, -1] = 0.0
    return logits.float()


@st.composite
def near_threshold_problems(draw):
    """Blocks of pairs far below the threshold, plus pairs whose selection score lies
    within 1% of score_thresh on both sides, or within a few float steps of it
    (every fourth pair, some exactly on it). With a factor, one of the two
    probabilities carries the score and the other is exactly 1 (sigmoid(40), a
    probability 1, or a softmax row of one finite logit), except for
    "after_selection", which selects on the class probability alone (its factor is
    random). The last column is the background."""
    activation = draw(st.sampled_from(ACTIVATIONS))
    mode = draw(st.sampled_from(FACTOR_MODES))
    factor_logits = draw(st.booleans())
    thresh = draw(st.sampled_from([0.001, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.995]))
    grouping = draw(st.sampled_from(["per_level", "per_image", "per_class"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    batch, classes = draw(st.integers(1, 2)), 6
    level_sizes = [120, 30] if grouping == "per_level" else [150]
    anchors = sum(level_sizes)
    near = 48
    joined = mode in ("sqrt", "before_threshold")
    carrier = "class" if not joined or draw(st.booleans()) else "factor"
    # The carried probability: the score itself, or its square under sqrt(p * 1).
    power = 2 if mode == "sqrt" else 1
    relative = (torch.rand(near, generator=gen, dtype=torch.float64) * 2 - 1) * 0.01
    carried = (thresh * (1 + relative)) ** power
    steps = [draw(st.integers(-3, 3)) for _ in range(0, near, 4)]
    logits = torch.empty(batch, anchors, classes)
    factor = None
    if mode is not None:
        factor = torch.full((batch, anchors), 40.0 if factor_logits else 1.0)
        if mode == "after_selection":
            factor = torch.rand(batch, anchors, generator=gen) * (4 if factor_logits else 1)
    far = torch.full((anchors,), 1e-9, dtype=torch.float64)
    for b in range(batch):
        hits = torch.randperm(anchors, generator=gen)[:near]
        rows = _class_inputs(activation, far, classes)
        if carrier == "class":
            near_rows = _class_inputs(activation, carried, classes)
            for i, step in zip(range(0, near, 4), steps):
                near_rows[i, 0] = _next_float(near_rows[i, 0], step)
            rows[hits] = near_rows
        else:
            rows[hits] = _class_inputs(activation, torch.ones(near, dtype=torch.float64), classes)
            values = carried.float()
            if factor_logits:
                values = torch.tensor(
                    [_logit(min(float(p), 1 - 1e-9)) for p in carried], dtype=torch.float32
                )
            for i, step in zip(range(0, near, 4), steps):
                values[i] = _next_float(values[i], step)
            factor[b, hits] = values
        # The foreground column of each row's pair varies: a random roll per row.
        shifts = torch.randint(0, classes - 1, (anchors,), generator=gen)
        index = (torch.arange(classes - 1)[None, :] - shifts[:, None]) % (classes - 1)
        logits[b, :, :-1] = rows[:, :-1].gather(1, index)
        logits[b, :, -1] = rows[:, -1]
    single_label = draw(st.booleans())
    rule = _rule(activation, mode, factor_logits, single_label, None, grouping == "per_class")
    return logits, factor, level_sizes, thresh, rule


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(problem=near_threshold_problems())
def test_scores_near_the_threshold_are_kept_exactly(problem):
    # Fails if a logit bound cuts a passing pair: e.g. with the 0.01 margin of
    # csrc/common/score_bounds.h (kBoundMargin) flipped to cut 1% too much.
    logits, factor, level_sizes, thresh, rule = problem
    background = logits.shape[2] - 1
    _, select, _ = _select(logits, factor, level_sizes, thresh, 10**6, background, **rule)
    if rule["factor_mode"] == "after_selection" and factor is not None:
        # The reported score is p * f; the pairs near the threshold are those of p.
        _, select, _ = reference.select_topk_loop(
            logits, None, level_sizes, thresh, 10**6, background, **rule
        )
    kept = select[select > 0]
    assert bool(((kept > thresh) & (kept < thresh * 1.01)).any()), (
        "the problem should have passing scores within 1% above the threshold"
    )


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "activation, mode, factor_logits",
    [
        ("sigmoid", None, True),
        ("sigmoid", "sqrt", True),
        ("sigmoid", "before_threshold", True),
        ("sigmoid", "after_selection", False),
        ("softmax", "sqrt", True),
        ("none", "before_threshold", True),
    ],
)
def test_blocks_across_the_grain_at_several_thread_counts(threads, activation, mode, factor_logits):
    # Levels of more than torch's grain (32768 elements) and of odd sizes: the sigmoid
    # bits depend on the chunk and the scalar tail of each thread's share. Sparse
    # (the gathered path) and dense (whole blocks) images.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        level_sizes, classes = [1203, 301, 77], 31
        anchors = sum(level_sizes)
        logits = torch.randn(2, anchors, classes, generator=gen)
        logits[0] = logits[0] * 1.5 - 7.0  # sparse: few pairs pass
        if activation == "none":
            logits = logits.sigmoid()
        factor = torch.randn(2, anchors, generator=gen) + 1.0
        if not factor_logits:
            factor = factor.sigmoid()
        if mode is None:
            factor = None
        for single_label in (False, True):
            for per_image in (False, True):
                rule = _rule(activation, mode, factor_logits, single_label, None, False)
                levels = [anchors] if per_image else level_sizes
                _select(logits, factor, levels, 0.05, 1000, None, **rule)
                _select(logits, factor, levels, 0.3, 50, None, **rule)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_blocks_across_the_grain_are_scored_whole_on_the_calling_thread(threads, dtype):
    # Not float32: every block is scored whole, as the oracle does; those past the
    # grain on the calling thread, where torch splits the sigmoid as the oracle's call.
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        level_sizes, classes = [1203, 77], 31
        logits = (torch.randn(2, 1280, classes, generator=gen) - 1.0).to(dtype)
        factor = torch.randn(2, 1280, 1, generator=gen).to(dtype)
        for activation, mode in [("sigmoid", "sqrt"), ("softmax", "before_threshold")]:
            rule = _rule(activation, mode, True, False, None, False)
            _select(logits, factor, level_sizes, 0.05, 1000, None, **rule)
            _select(logits, factor, [1280], 0.05, 1000, None, **rule)
    finally:
        torch.set_num_threads(previous)


def test_per_class_is_ssd_like_with_a_background_column():
    # per_class over the image's one level: softmax, background column 0, as SSD.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 500, 21, generator=gen) * 3
    flat, scores, counts = _select(
        logits, None, [500], 0.1, 20, 0, **_rule("softmax", None, True, False, None, True)
    )
    assert flat.shape == (2, 21, 20) and counts.shape == (2, 21)
    assert int(counts[:, 0].max()) == 0, "the background column is never reported"
    assert bool((flat[:, 1:][flat[:, 1:] >= 0] % 21 != 0).all())
    assert int(counts.sum()) > 0


def test_single_label_takes_the_lower_column_among_equal_scores():
    logits = torch.tensor([[[2.0, 3.0, 3.0, float("nan")], [40.0, 41.0, 1.0, 0.0]]])
    flat, scores, counts = _select(
        logits, None, [2], 0.5, 10, None, **_rule("sigmoid", None, True, True, None, False)
    )
    # Row 0: columns 1 and 2 tie (NaN ignored): column 1. Row 1: sigmoid(40) and
    # sigmoid(41) are both exactly 1.0: column 0.
    assert flat[0, 0, :2].tolist() == [4, 1]
    assert int(counts[0, 0]) == 2


def test_allow_list_applies_after_the_best_column():
    logits = torch.tensor([[[0.0, 5.0, 4.0], [0.0, 1.0, 4.0]]])
    flat, _, counts = _select(
        logits, None, [2], 0.5, 10, None, **_rule("sigmoid", None, True, True, [2], False)
    )
    # Row 0's best is column 1, not allowed: nothing; row 1's best is column 2.
    assert flat[0, 0, : int(counts[0, 0])].tolist() == [5]


_POISONED = r"""
import json, torch
from ssd_post import ops, reference
failures = []
gen = torch.Generator().manual_seed(0)
logits = torch.randn(2, 1300, 29, generator=gen) * 1.5 - 3.0
factor = torch.randn(2, 1300, generator=gen)
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    for activation in ("sigmoid", "softmax"):
        for mode in ("sqrt", "before_threshold", "after_selection"):
            for levels in ([1300], [1000, 300]):
                kw = dict(score_activation=activation, factor_mode=mode)
                args = (logits, factor, levels, 0.1, 300, None)
                got = ops.select_topk_op(*args, **kw)
                want = reference.select_topk_loop(*args, **kw)
                if not all(torch.equal(g, w) for g, w in zip(got, want)):
                    failures.append(f"{activation} {mode} {levels} threads={threads}")
print(json.dumps({"mode": ops.per_level_cpu_scoring(), "failures": failures}))
"""


@pytest.mark.slow  # a fresh process: the self-check runs once per thread count
def test_failed_self_check_scores_every_rule_whole():
    env = dict(os.environ, SSD_POST_POISON_SIGMOID_SELF_CHECK="1")
    result = subprocess.run(
        [sys.executable, "-c", _POISONED],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mode"] == "whole_block"
    assert report["failures"] == []


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(problem=rules_and_inputs())
def test_every_rule_equals_the_oracle_more_examples(problem):
    logits, factor, level_sizes, thresh, topk, background, rule = problem
    _select(logits, factor, level_sizes, thresh, topk, background, **rule)
