"""The per-level selection op ``ssd_post::select_topk`` equals the oracle
(``reference.select_flat_loop``, torch ops on whole blocks): its CPU kernel to
the bit; its CUDA kernel (on a GPU where there is one, and everywhere through the
CUDA emulator, tests/cuda_emulation) with the same pairs in the same rank order per
(image, level) and scores within float rounding (the device's expf against torch's
CPU sigmoid)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuda_emulation
from common_utils import cuda_kernel_param
from cuda_parity import assert_ranked_rows_match
from ssd_post import PostprocessConfig, family, ops, reference

pytestmark = pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs a C++ compiler")


def _device_op(logits, factor, level_sizes, *arguments):
    out = ops.select_topk_op(
        logits.cuda(), None if factor is None else factor.cuda(), level_sizes, *arguments
    )
    return tuple(t.cpu() for t in out)


# The op's signature: (logits, factor, level_sizes, *select_topk_arguments).
_cpu_op = ops.select_topk_op
_emulated_op = cuda_emulation.select_topk


@pytest.fixture(
    params=[
        cuda_kernel_param(),
        "emulated",
        "cpu",
    ]
)
def select_op(request):
    return {"device": _device_op, "emulated": _emulated_op, "cpu": _cpu_op}[request.param]


def _config(**kw) -> PostprocessConfig:
    base = dict(
        score_thresh=0.05,
        nms_thresh=0.5,
        topk_candidates=30,
        detections_per_img=100,
        score_activation="sigmoid",
        background_class=None,
        selection="per_level",
    )
    base.update(kw)
    return PostprocessConfig(**base)


def _groups(image, anchor, label, score, level_sizes, batch, num_classes):
    """(image, level) -> (flat indices, scores) in the order given."""
    ends = torch.tensor(level_sizes).cumsum(0)
    level = torch.bucketize(anchor, ends, right=True)
    flat = anchor * num_classes + label
    return {
        (b, lvl): (flat[(image == b) & (level == lvl)], score[(image == b) & (level == lvl)])
        for b in range(batch)
        for lvl in range(len(level_sizes))
    }


def assert_same_selection(select_op, logits, centerness, config, level_sizes):
    batch, _, num_classes = logits.shape
    expected = reference.select_flat_loop(logits, centerness, config, level_sizes)
    got = family.select_flat(logits, centerness, config, level_sizes, select_op)
    if select_op is _cpu_op:  # torch's own sigmoid bits, the oracle's order
        for name, want_t, got_t in zip(("image", "anchor", "label", "score"), expected, got):
            assert torch.equal(got_t, want_t), f"{name} differs from the oracle"
    want = _groups(*expected, level_sizes, batch, num_classes)
    have = _groups(*got, level_sizes, batch, num_classes)
    assert sum(v[0].numel() for v in want.values()) > 0, "the case should select something"
    for key in want:
        (cpu_flat, cpu_score), (gpu_flat, gpu_score) = want[key], have[key]
        assert gpu_flat.numel() == cpu_flat.numel(), f"(image, level) {key}: count differs"
        no_boxes = torch.zeros(cpu_flat.numel(), 4)
        assert_ranked_rows_match(cpu_score, gpu_score, cpu_flat, gpu_flat, no_boxes, no_boxes)


def _logits(batch, anchors, classes, seed, scale=1.5, centerness=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors, classes, generator=gen) * scale
    ctr = torch.randn(batch, anchors, 1, generator=gen) if centerness else None
    return logits, ctr


CASES = {
    # most pairs pass and every level holds more than topk: the radix select
    "retinanet_radix_select": (dict(), [60, 20, 6], 7, False),
    # topk above every level's pairs: all passing pairs, no select
    "topk_above_pairs": (dict(topk_candidates=5000), [30, 8, 2], 5, False),
    "fcos_centerness": (
        dict(score_thresh=0.2, score_activation="sigmoid_centerness", box_coder="linear"),
        [50, 12, 3],
        6,
        True,
    ),
    "background_first": (dict(background_class=0), [40, 10], 6, False),
    "background_last": (dict(background_class="last", topk_candidates=7), [40, 10], 6, False),
    "empty_level": (dict(), [25, 0, 9], 4, False),
    "threshold_zero": (dict(score_thresh=0.0, topk_candidates=50), [30, 6], 3, False),
    "high_threshold_no_bound": (dict(score_thresh=0.995, topk_candidates=5), [80, 20], 5, False),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 2])
def test_kernel_selects_what_the_cpu_path_selects(select_op, case, batch):
    overrides, level_sizes, classes, with_centerness = CASES[case]
    config = _config(**overrides)
    scale = 4.0 if case == "high_threshold_no_bound" else 1.5
    logits, ctr = _logits(
        batch,
        sum(level_sizes),
        classes,
        seed=len(case) + batch,
        scale=scale,
        centerness=with_centerness,
    )
    assert_same_selection(select_op, logits, ctr, config, level_sizes)


def test_equal_scores_rank_by_flat_index(select_op):
    # Logits on a coarse grid: many pairs share a score bit for bit; inside a level
    # they rank by anchor * C + class, on both paths, and the top-k cut takes the
    # lowest flat indices of the tied run.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-2, 3, (2, 45, 4), generator=gen).float()
    assert_same_selection(select_op, logits, None, _config(topk_candidates=11), [30, 15])


def test_nan_and_inf_logits(select_op):
    logits, ctr = _logits(2, 40, 5, seed=9, centerness=True)
    logits[0, 3, 1] = float("nan")
    logits[0, 4, :] = float("inf")
    logits[1, 5, 2] = float("-inf")
    ctr[1, 7, 0] = float("nan")
    ctr[0, 8, 0] = float("inf")
    config = _config(
        score_thresh=0.2,
        score_activation="sigmoid_centerness",
        box_coder="linear",
        topk_candidates=25,
    )
    assert_same_selection(select_op, logits, ctr, config, [30, 10])


def test_larger_levels_keep_their_ranking(select_op):
    # More pairs per block than threads, several chunks per pass, at RetinaNet's
    # topk of 1000 per level.
    logits, _ = _logits(1, 700, 9, seed=5)
    assert_same_selection(select_op, logits, None, _config(topk_candidates=1000), [500, 150, 50])


def test_outputs_are_padded_past_each_count():
    logits, _ = _logits(2, 20, 3, seed=2, scale=0.5)
    flat, scores, counts = cuda_emulation.select_topk(logits, None, [12, 8], 0.6, 40, None)
    assert flat.shape == scores.shape == (2, 2, 36) and counts.shape == (2, 2)
    k = torch.arange(36)
    past = k >= counts[..., None]
    assert bool(past.any()) and bool((~past).any())
    assert bool((flat[past] == -1).all()) and bool((scores[past] == 0).all())
    assert bool((scores[~past] > 0.6).all())


def test_fake_kernel_shapes_equal_the_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    logits, _ = _logits(2, 20, 3, seed=2)
    real = cuda_emulation.select_topk(logits, None, [12, 8], 0.05, 40, None)
    with FakeTensorMode() as mode:
        fake = torch.ops.ssd_post.select_topk(
            mode.from_tensor(logits), None, [12, 8], 0.05, 40, None
        )
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_registered_for_cuda_exactly_when_the_other_ops_are():
    has = torch._C._dispatch_has_kernel_for_dispatch_key("ssd_post::select_topk", "CUDA")
    assert has is ops.has_cuda_kernels()


@st.composite
def level_problems(draw):
    """Level sizes around the 256-thread chunks, topk around the level sizes, every
    activation and background setting, logits on a grid (exact ties) or spread."""
    levels = draw(st.lists(st.integers(0, 90), min_size=1, max_size=5))
    if sum(levels) == 0:
        levels[0] = 1
    classes = draw(st.integers(1, 6))
    fcos = draw(st.booleans())
    background = draw(st.sampled_from([None, "first", "last"])) if classes > 1 else None
    config = _config(
        score_thresh=draw(st.sampled_from([0.0, 0.05, 0.2, 0.5])),
        topk_candidates=draw(st.integers(1, 120)),
        background_class=background,
        **(dict(score_activation="sigmoid_centerness", box_coder="linear") if fcos else {}),
    )
    seed = draw(st.integers(0, 2**16))
    logits, ctr = _logits(draw(st.integers(1, 3)), sum(levels), classes, seed, centerness=fcos)
    if draw(st.booleans()):
        logits = (logits * 2).round() / 2  # exact ties between pairs
    return logits, ctr, config, levels


@pytest.mark.slow  # 60 emulated problems
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(problem=level_problems())
def test_kernel_matches_cpu_path_on_random_problems(select_op, problem):
    logits, ctr, config, levels = problem
    batch, _, num_classes = logits.shape
    expected = reference.select_flat_loop(logits, ctr, config, levels)
    if expected[0].numel() == 0:
        flat, _, counts = select_op(
            logits,
            ctr,
            levels,
            config.score_thresh,
            config.topk_candidates,
            config.resolve_background_class(num_classes),
        )
        assert int(counts.sum()) == 0
        return
    assert_same_selection(select_op, logits, ctr, config, levels)
