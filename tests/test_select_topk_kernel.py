"""The CUDA kernels of ``ssd_post::select_topk`` take every ScoreRule (activation,
per-anchor factor and its mode, single label, class allow-list, background, level /
per-image / per-class groups) and select what the oracle
``reference.select_topk_loop`` selects: on a GPU where there is one, and everywhere
through the CUDA emulator (tests/cuda_emulation), which runs the kernels' code.

The device's expf rounds differently from torch's CPU exp, so where a rule goes
through exp (softmax, sigmoid, a factor given as logits) a pair whose oracle score
lies within ``TRANSCENDENTAL_RTOL`` of the threshold, or of the group's k-th score,
may fall on either side; everything else must match pair for pair, in rank order.
The same tolerance covers "sqrt": torch's CPU square root is not always the correctly
rounded one (1 ULP off for some inputs), the device's is. "none" without a factor or
with a factor given as probabilities, other than "sqrt", is plain IEEE products:
there the kernels must equal the oracle to the bit, one ULP from the threshold too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import product
from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import cuda_emulation
from common_utils import cuda_kernel_param
from ssd_post import ops, reference

pytestmark = pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs a C++ compiler")

ACTIVATIONS = ("softmax", "sigmoid", "none")
# (factor_mode, factor_logits); None: no factor tensor.
FACTORS = (
    None,
    ("sqrt", True),
    ("sqrt", False),
    ("before_threshold", True),
    ("before_threshold", False),
    ("after_selection", True),
    ("after_selection", False),
)
FACTOR_IDS = ["no_factor"] + [f"{m}_{'logits' if lg else 'probs'}" for m, lg in FACTORS[1:]]
# per_level: several levels; per_image: level_sizes [A]; per_class: [A], one group per class.
MODES = ("per_level", "per_image", "per_class")
# A few ULPs of float32 (the device's expf and sqrtf, the softmax sum's order), relative.
TRANSCENDENTAL_RTOL = 1e-5
# Below this a probability is subnormal or nearly so: relative rounding means nothing.
SUBNORMAL_FLOOR = 1e-37


@dataclass(frozen=True)
class Rule:
    """One ScoreRule with its grouping, as select_topk takes it."""

    activation: str
    factor: Optional[Tuple[str, bool]] = None  # (factor_mode, factor_logits)
    single_label: bool = False
    classes: Optional[Tuple[int, ...]] = None
    background: Optional[int] = None
    per_class: bool = False

    @property
    def exact(self) -> bool:
        """No exp and no square root: the kernels' scores are the oracle's bits."""
        if self.factor is None:
            return self.activation == "none"
        mode, logits = self.factor
        return self.activation == "none" and not logits and mode != "sqrt"

    @property
    def rtol(self) -> float:
        return 0.0 if self.exact else TRANSCENDENTAL_RTOL

    def args(self) -> tuple:
        """select_topk's arguments after (logits, factor, level_sizes, thresh, topk)."""
        mode, logits = self.factor or ("sqrt", True)
        return (
            self.background,
            self.activation,
            mode,
            logits,
            self.single_label,
            None if self.classes is None else list(self.classes),
            self.per_class,
        )


def _emulated_op(logits, factor, level_sizes, thresh, topk, rule: Rule):
    return cuda_emulation.select_topk(logits, factor, level_sizes, thresh, topk, *rule.args())


def _device_op(logits, factor, level_sizes, thresh, topk, rule: Rule):
    out = ops.select_topk_op(
        logits.cuda(),
        None if factor is None else factor.cuda(),
        level_sizes,
        thresh,
        topk,
        *rule.args(),
    )
    return tuple(t.cpu() for t in out)


def _oracle(logits, factor, level_sizes, thresh, topk, rule: Rule):
    return reference.select_topk_loop(logits, factor, level_sizes, thresh, topk, *rule.args())


@pytest.fixture(
    params=[
        cuda_kernel_param(),
        "emulated",
    ]
)
def select_op(request):
    return {"device": _device_op, "emulated": _emulated_op}[request.param]


def _pair_scores(logits: Tensor, factor: Optional[Tensor], rule: Rule) -> Tuple[Tensor, Tensor]:
    """The oracle's selection and reported score of every pair, each Tensor[B, A * C]
    (NaN where the score is NaN or -inf): the oracle with every pair passing."""
    B, A, C = logits.shape

    def every_pair(with_factor: Optional[Tensor]) -> Tensor:
        every = replace(rule, single_label=False, classes=None, background=None, per_class=False)
        flat, scores, counts = _oracle(logits, with_factor, [A], -math.inf, A * C, every)
        out = torch.full((B, A * C), math.nan)
        for b in range(B):
            n = int(counts[b, 0])
            out[b, flat[b, 0, :n]] = scores[b, 0, :n]
        return out

    report = every_pair(factor)
    if rule.factor is not None and rule.factor[0] == "after_selection":
        return every_pair(None), report  # ranked on the class probability alone
    return report, report


def assert_matches_oracle(got, logits, factor, level_sizes, thresh, topk, rule: Rule) -> int:
    """``got`` (flat, scores, counts) is the oracle's answer, up to the rounding of
    exp (see the module docstring); returns how many pairs the oracle selects."""
    want = _oracle(logits, factor, level_sizes, thresh, topk, rule)
    for name, w, g in zip(("flat", "scores", "counts"), want, got):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), f"{name}: shape or dtype differs"
    if rule.exact:
        # NaN where the oracle reports NaN ("after_selection" with a NaN factor).
        for name, w, g in zip(("flat", "scores", "counts"), want, got):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=name)
        return int(want[2].sum())
    select, report = _pair_scores(logits, factor, rule)
    B, G, k = want[0].shape
    C = logits.shape[2]
    starts = np.cumsum([0] + list(level_sizes)).tolist()
    rtol, t32 = rule.rtol, float(np.float32(thresh))

    def near(value: float, target: float) -> bool:
        return abs(value - target) <= rtol * abs(target) + SUBNORMAL_FLOOR

    for b in range(B):
        s, rep = select[b].tolist(), report[b]
        labelled = set()
        for g in range(G):
            nw, ng = int(want[2][b, g]), int(got[2][b, g])
            wf, gf = want[0][b, g, :nw].tolist(), got[0][b, g, :ng].tolist()
            where = f"image {b}, group {g}"
            assert 0 <= ng <= k, f"{where}: count {ng} outside [0, {k}]"
            assert bool((got[0][b, g, ng:] == -1).all()), f"{where}: flat padding"
            assert bool((got[1][b, g, ng:] == 0).all()), f"{where}: score padding"
            assert len(set(gf)) == ng, f"{where}: a pair twice"
            # Where each selected pair may come from.
            first, end = (starts[0], starts[-1]) if rule.per_class else starts[g : g + 2]
            for f in gf:
                anchor, cls = divmod(f, C)
                assert first <= anchor < end, f"{where}: pair {f} outside its group"
                assert not rule.per_class or cls == g, f"{where}: pair {f} of another class"
                assert cls != rule.background, f"{where}: pair {f} of the background"
                assert rule.classes is None or cls in rule.classes, f"{where}: class {cls}"
                if rule.single_label:
                    assert anchor not in labelled, f"{where}: anchor {anchor} labelled twice"
                    labelled.add(anchor)
                    row = [
                        v
                        for c, v in enumerate(s[anchor * C : (anchor + 1) * C])
                        if c != rule.background and not math.isnan(v)
                    ]
                    assert not s[f] < max(row, default=-math.inf) * (1 - rtol) - SUBNORMAL_FLOOR, (
                        f"{where}: anchor {anchor} labelled {cls}, not its best class"
                    )
            # A pair selected by one side only lies at the threshold or at the cut.
            for f in set(gf) ^ set(wf):
                at_cut = nw == k and near(s[f], s[wf[-1]])
                assert near(s[f], t32) or at_cut, (
                    f"{where}: pair {f} (score {s[f]!r}, threshold {t32!r}) is "
                    f"{'only in the kernel' if f in gf else 'missing from the kernel'}"
                )
            # Ranked by score; equal reported scores by flat index.
            ranked = rule.factor is None or rule.factor[0] != "after_selection"
            scores = got[1][b, g, :ng].tolist()
            for i in range(ng - 1):
                a, c = gf[i], gf[i + 1]
                assert not s[a] < s[c] * (1 - rtol) - SUBNORMAL_FLOOR, f"{where}: rank {i}"
                assert not (ranked and scores[i] == scores[i + 1] and a > c), (
                    f"{where}: equal scores at rank {i} out of flat order"
                )
            torch.testing.assert_close(
                got[1][b, g, :ng], rep[gf], rtol=rtol, atol=SUBNORMAL_FLOOR, equal_nan=True
            )
    return int(want[2].sum())


def _problem(B: int, A: int, C: int, seed: int, rule: Rule, grid: bool = True):
    """Logits [B, A, C] (probabilities for "none") and the factor [B, A] (or [B, A, 1])
    of the rule; on a grid, many pairs tie exactly."""
    gen = torch.Generator().manual_seed(seed)
    if rule.activation == "none":
        logits = torch.rand(B, A, C, generator=gen)
    else:
        logits = torch.randn(B, A, C, generator=gen) * 2
    if grid:
        step = 32 if rule.activation == "none" else 4
        logits = (logits * step).round() / step
    factor = None
    if rule.factor is not None:
        shape = (B, A, 1) if seed % 2 else (B, A)
        draw = torch.randn if rule.factor[1] else torch.rand
        factor = draw(*shape, generator=gen)
        if grid:
            factor = (factor * 16).round() / 16
    return logits, factor


# Level layouts: several levels (one empty), or one block of every anchor.
LAYOUTS = {"per_level": [37, 0, 11, 5], "per_image": [53], "per_class": [53]}
# A threshold that passes a good share of pairs under each rule.
THRESH = {"softmax": 0.15, "sigmoid": 0.3, "none": 0.3}
# (single_label, classes, background_class): every combination of the knobs.
KNOBS = list(product((False, True), (None, (0, 2, 3)), (None, 1)))
# Four combinations that hold each pair of knob settings at least once.
PAIRWISE = [(False, None, None), (False, (0, 2, 3), 1), (True, None, 1), (True, (0, 2, 3), None)]


def _rule_matrix():
    """Every mode x activation x factor x knobs. The emulator runs a launch in
    fibers, a fraction of a second each: the default run takes one combination of
    knobs per rule, in turn the four of PAIRWISE (every pair of knob settings
    several times over the rules); the slow run all eight."""
    rules = product(MODES, ACTIVATIONS, zip(FACTORS, FACTOR_IDS))
    for i, (mode, activation, (factor, factor_id)) in enumerate(rules):
        for knobs in KNOBS:
            single_label, classes, background = knobs
            name = (
                f"{mode}-{activation}-{factor_id}-{'single' if single_label else 'multi'}"
                f"-{'allowlist' if classes else 'all'}-{'nobg' if background is None else 'bg'}"
            )
            marks = () if knobs == PAIRWISE[i % len(PAIRWISE)] else (pytest.mark.slow,)
            rule = Rule(activation, factor, single_label, classes, background, mode == "per_class")
            yield pytest.param(mode, rule, marks=marks, id=name)


@pytest.mark.parametrize("mode, rule", list(_rule_matrix()))
def test_every_rule_matches_the_oracle(select_op, mode, rule):
    level_sizes = LAYOUTS[mode]
    thresh = THRESH[rule.activation]
    if rule.factor is not None and rule.factor[0] == "before_threshold":
        thresh /= 2  # products of two probabilities
    seed = len(mode) + 7 * int(rule.single_label) + 3 * int(rule.background is None)
    logits, factor = _problem(2, sum(level_sizes), 5, seed, rule)
    topk = 9  # below most groups' passing pairs: the radix select cuts ties
    got = select_op(logits, factor, level_sizes, thresh, topk, rule)
    selected = assert_matches_oracle(got, logits, factor, level_sizes, thresh, topk, rule)
    assert selected > 0, "the case should select something"


def _nan_inf_matrix():
    """Every activation x factor, with and without single label (the default run
    takes one of the two, in turn)."""
    for i, (activation, (factor, factor_id)) in enumerate(
        product(ACTIVATIONS, zip(FACTORS, FACTOR_IDS))
    ):
        for single_label in (False, True):
            marks = () if single_label == bool(i % 2) else (pytest.mark.slow,)
            name = f"{activation}-{factor_id}-{'single' if single_label else 'multi'}"
            rule = Rule(activation, factor, single_label=single_label, background=0)
            yield pytest.param(rule, marks=marks, id=name)


@pytest.mark.parametrize("rule", list(_nan_inf_matrix()))
def test_nan_and_inf_inputs(select_op, rule):
    logits, factor = _problem(2, 40, 4, seed=11, rule=rule, grid=False)
    logits[0, 3, 1] = math.nan
    logits[0, 4, :] = math.inf
    logits[1, 5, 2] = -math.inf
    logits[1, 6, 1:3] = math.inf  # equal infinite scores: the lower class
    if factor is not None:
        factor.view(2, 40)[1, 7] = math.nan
        factor.view(2, 40)[0, 8] = math.inf
        factor.view(2, 40)[1, 9] = -math.inf
    got = select_op(logits, factor, [30, 10], 0.2, 25, rule)
    assert assert_matches_oracle(got, logits, factor, [30, 10], 0.2, 25, rule) > 0


def test_levels_beyond_the_key_cache(select_op):
    # A level of more pairs than the select kernel keeps in shared memory
    # (kMaxCachedAnchors): every pass recomputes the keys.
    rule = Rule("sigmoid", ("sqrt", True), background=3)
    logits, f = _problem(1, 2700, 4, seed=5, rule=rule, grid=False)
    got = select_op(logits, f, [2650, 50], 0.2, 1000, rule)
    assert assert_matches_oracle(got, logits, f, [2650, 50], 0.2, 1000, rule) > 1000


def _float_steps(value: float, steps: int) -> List[float]:
    """The float32 values from `steps` below `value` (rounded to float32) to `steps`
    above it, one ULP apart."""
    center = np.float32(value)
    out = [center]
    down = up = center
    for _ in range(steps):
        down = np.nextafter(down, np.float32(-np.inf))
        up = np.nextafter(up, np.float32(np.inf))
        out += [down, up]
    return sorted(float(v) for v in out)


def _inverse(probability: float, logits: bool) -> float:
    """The input whose probability is `probability`: its logit, or itself. Softmax
    rows here are [x, 0], whose class-0 probability is sigmoid(x) too."""
    if not logits:
        return probability
    return math.log(probability) - math.log1p(-probability)


def _near_threshold_rows(rule: Rule, thresh: float) -> Tuple[Tensor, Optional[Tensor]]:
    """Logits [1, N, 2] (column 1 the background, 0 as a logit) and the factor [1, N]
    whose selection scores lie within one to a few ULPs, 0.1% and 1% on both sides
    of `thresh`: the class probability varied with the factor at 1, the factor varied
    with the class at 1, and both varied about 1/2 where that reaches the threshold.
    The targets are stepped in ULPs of the score, each inverted and its input
    stepped by one ULP: the inverse alone can sit where the score is flat (softmax
    and sigmoid near 0.5)."""
    mode, factor_logits = rule.factor or (None, False)
    class_logits = rule.activation != "none"
    joined = mode in ("sqrt", "before_threshold")
    # The product of class and factor probabilities that gives a score of `target`.
    product_of = (lambda t: t * t) if mode == "sqrt" else (lambda t: t)
    one_class = 30.0 if class_logits else 1.0  # probability 1.0 exactly in float32
    one_factor = 30.0 if factor_logits else 1.0
    half = 0.0 if factor_logits else 0.5  # sigmoid(0) = 0.5 exactly
    t32 = float(np.float32(thresh))
    targets = _float_steps(t32, 3) + [t32 * (1 + r) for r in (-1e-2, -1e-3, 1e-3, 1e-2)]
    rows = []  # (class input, factor input)
    for target in targets:
        wanted = product_of(target) if joined else target
        sides = [(wanted, True, one_factor)] if joined else [(wanted, True, half)]
        if joined:
            sides.append((wanted, False, one_class))
            if 2 * wanted < 1:
                sides.append((2 * wanted, True, half))
        for probability, vary_class, other in sides:
            for v in _float_steps(
                _inverse(probability, class_logits if vary_class else factor_logits), 1
            ):
                rows.append((v, other) if vary_class else (other, v))
    logits = torch.tensor([[[x, 0.0] for x, _ in rows]], dtype=torch.float32)
    factor = None if rule.factor is None else torch.tensor([[y for _, y in rows]])
    return logits, factor


def _near_threshold_matrix():
    """Every activation x factor at four thresholds (all but 0.5 round in float32);
    the default run takes one threshold per rule, in turn. A softmax probability
    p_c = exp(x_c - max) / S has S >= 1 + p_c, so its logit bound is as tight as
    its margin only for small thresholds such as SSD's 0.01: 0.001 is the one that
    tests it."""
    thresholds = (0.001, 0.05, 0.3, 0.5)
    rules = product(ACTIVATIONS, zip(FACTORS, FACTOR_IDS))
    for i, (activation, (factor, factor_id)) in enumerate(rules):
        for j, thresh in enumerate(thresholds):
            marks = () if j == i % len(thresholds) else (pytest.mark.slow,)
            rule = Rule(activation, factor, background=1)
            yield pytest.param(rule, thresh, marks=marks, id=f"{activation}-{factor_id}-{thresh}")


@pytest.mark.parametrize("rule, thresh", list(_near_threshold_matrix()))
def test_scores_next_to_the_threshold(select_op, rule, thresh):
    # Every pair is compared (no top-k cut): a pruning bound that cuts 0.1% too
    # much, or a threshold compared in double rather than float32, fails here.
    logits, f = _near_threshold_rows(rule, thresh)
    select, _ = _pair_scores(logits, f, rule)
    t32 = float(np.float32(thresh))
    scores = select[0, 0::2]  # column 0; column 1 is the background
    close = 4 * float(np.spacing(np.float32(t32)))
    assert bool(((scores > t32) & (scores <= t32 + close)).any()), "nothing just above"
    assert bool(((scores <= t32) & (scores >= t32 - close)).any()), "nothing just below"
    n = logits.shape[1]
    got = select_op(logits, f, [n], thresh, 2 * n, rule)
    selected = assert_matches_oracle(got, logits, f, [n], thresh, 2 * n, rule)
    assert 0 < selected < n


@pytest.mark.parametrize("factor", FACTORS, ids=FACTOR_IDS)
def test_zero_threshold_keeps_only_positive_scores(select_op, factor):
    # "none" scores may be 0, -0 or negative: only scores > 0 pass, the smallest
    # subnormal included.
    rule = Rule("none", factor)
    tiny = float(np.nextafter(np.float32(0), np.float32(1)))
    values = [0.0, -0.0, tiny, -tiny, 1e-30, -0.5, 0.25, 1.0]
    logits = torch.tensor([[[v, 0.5] for v in values]])
    f = None if factor is None else torch.full((1, len(values)), 30.0 if factor[1] else 1.0)
    got = select_op(logits, f, [len(values)], 0.0, 100, rule)
    assert assert_matches_oracle(got, logits, f, [len(values)], 0.0, 100, rule) > 0


@st.composite
def topk_problems(draw):
    """Any rule and grouping; levels around the 256-thread chunks, topk around the
    group sizes, logits on a grid (exact ties) or spread."""
    mode = draw(st.sampled_from(MODES))
    C = draw(st.integers(1, 7))
    if mode == "per_level":
        levels = draw(st.lists(st.integers(0, 90), min_size=1, max_size=5))
    else:
        levels = [draw(st.integers(1, 300))]
    if sum(levels) == 0:
        levels[0] = 1
    background = draw(st.sampled_from([None, 0, C - 1])) if C > 1 else None
    foreground = [c for c in range(C) if c != background]
    classes = None
    if draw(st.booleans()):
        classes = tuple(sorted(draw(st.sets(st.sampled_from(foreground), min_size=1))))
    rule = Rule(
        draw(st.sampled_from(ACTIVATIONS)),
        draw(st.sampled_from(FACTORS)),
        draw(st.booleans()),
        classes,
        background,
        mode == "per_class",
    )
    thresh = draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))
    topk = draw(st.integers(1, 150))
    B = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    logits, factor = _problem(B, sum(levels), C, seed, rule, grid=draw(st.booleans()))
    return logits, factor, levels, thresh, topk, rule


def _check_random_problem(select_op, problem):
    logits, factor, levels, thresh, topk, rule = problem
    got = select_op(logits, factor, levels, thresh, topk, rule)
    assert_matches_oracle(got, logits, factor, levels, thresh, topk, rule)


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(problem=topk_problems())
def test_kernel_matches_the_oracle_on_random_problems(select_op, problem):
    _check_random_problem(select_op, problem)


@pytest.mark.slow  # 300 emulated problems
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(problem=topk_problems())
def test_kernel_matches_the_oracle_on_many_random_problems(select_op, problem):
    _check_random_problem(select_op, problem)
