"""The CPU kernel of ``ssd_post::select_topk`` (csrc/cpu/select_per_level.cpp):
torch's sigmoid bits at every thread count and CPU capability, its self-check and
fallback, the logit bound near the threshold, and the rules it shares with CUDA
(level limit, slots per level)."""

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

import ssd_post
from ssd_post import PostprocessConfig, ops, reference
from ssd_post.family import select_flat as select_per_level

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process per CPU capability (torch reads ATEN_CPU_CAPABILITY once):
# for each thread count, the op against the oracle, and ssd_post.postprocess against
# torchvision's RetinaNet / FCOS postprocess_detections, on levels whose blocks
# cross the grain (32768 elements) with a scalar tail in every thread's chunk.
_WORKER = r"""
import json, sys
import torch
import ssd_post
from benchmarks.family import same_up_to_ties
from ssd_post import PostprocessConfig, ops, reference
from ssd_post.family import select_flat as select_per_level

CONFIGS = {
    "retinanet": PostprocessConfig(
        score_thresh=0.05, nms_thresh=0.5, topk_candidates=1000, detections_per_img=300,
        box_weights=(1, 1, 1, 1), score_activation="sigmoid", background_class=None,
        selection="per_level"),
    "fcos": PostprocessConfig(
        score_thresh=0.2, nms_thresh=0.6, topk_candidates=1000, detections_per_img=100,
        score_activation="sigmoid_centerness", background_class=None, selection="per_level",
        box_coder="linear"),
}
LEVELS = {"retinanet": [3001, 750, 190, 47], "fcos": [2900, 731, 180, 45]}


def inputs(model, scenario, batch=2, classes=91):
    gen = torch.Generator().manual_seed(len(model) + len(scenario))
    level_sizes = LEVELS[model]
    anchors_n = sum(level_sizes)
    logits = torch.randn(batch, anchors_n, classes, generator=gen)
    if scenario == "sparse":  # a trained head: a few pairs above the bound
        logits -= 8.0
        hits = torch.randint(0, anchors_n * classes, (batch, 300), generator=gen)
        logits.view(batch, -1).scatter_(1, hits, 4.0 * torch.rand(batch, 300, generator=gen))
    else:  # many pairs pass: the top-k bound, and whole blocks for the small levels
        logits = logits * 1.5 - 4.0
    xy = torch.rand(anchors_n, 2, generator=gen) * 600
    anchors = torch.cat((xy, xy + 8 + 40 * torch.rand(anchors_n, 2, generator=gen)), dim=1)
    locs = 0.3 * torch.randn(batch, anchors_n, 4, generator=gen)
    centerness = None
    if model == "fcos":
        locs = locs.abs() + 0.5
        centerness = torch.randn(batch, anchors_n, 1, generator=gen) * 2
    return locs, logits, anchors, [(640, 600), (480, 640)][:batch], level_sizes, centerness


failures, modes = [], {}
for threads in [int(t) for t in sys.argv[1].split(",")]:
    torch.set_num_threads(threads)
    modes[threads] = ops.per_level_cpu_scoring()
    for model, config in CONFIGS.items():
        for scenario in ("sparse", "dense"):
            locs, logits, anchors, sizes, levels, ctr = inputs(model, scenario)
            case = f"{model} {scenario} threads={threads}"
            got = select_per_level(logits, ctr, config, levels)
            want = reference.select_flat_loop(logits, ctr, config, levels)
            if not all(torch.equal(g, w) for g, w in zip(got, want)):
                failures.append(f"{case}: selection differs from the oracle")
            kw = dict(level_sizes=levels, centerness=ctr)
            ours = ssd_post.postprocess(locs, logits, anchors, sizes, config, **kw)
            theirs = reference.torchvision_postprocess(locs, logits, anchors, sizes, config, **kw)
            if not same_up_to_ties(ours, theirs):
                failures.append(f"{case}: detections differ from torchvision")
            if int(ours.num_detections.min()) == 0:
                failures.append(f"{case}: no detections to compare")
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "modes": modes,
                  "failures": failures}))
"""


def _run_worker(threads, capability=None, poison=False):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.pop("SSD_POST_POISON_SIGMOID_SELF_CHECK", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    if poison:
        env["SSD_POST_POISON_SIGMOID_SELF_CHECK"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, ",".join(map(str, threads))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]


def _native_capability() -> str:
    """The widest capability torch runs on this CPU (ATEN_CPU_CAPABILITY left unset)."""
    if "ATEN_CPU_CAPABILITY" not in os.environ:
        return torch.backends.cpu.get_cpu_capability()
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.slow  # one process per capability, four thread counts each
@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_bits_equal_torchvision_at_every_thread_count_and_capability(capability):
    native = _native_capability()
    if native not in _CAPABILITIES or (
        _CAPABILITIES.index(capability.upper()) > _CAPABILITIES.index(native)
    ):
        # torch would run the wider kernels anyway and die of an illegal instruction.
        pytest.skip(f"this CPU lacks {capability.upper()} (torch runs {native} here)")
    report = _run_worker([1, 2, 3, 7], capability)
    assert report["capability"] == capability.upper()
    assert report["failures"] == []
    if capability != "default":
        # torch's vectorised loop is modelled for these: the fast path must verify.
        assert set(report["modes"].values()) == {"gathered"}, report["modes"]


@pytest.mark.slow  # a fresh process: the self-check runs once per thread count
def test_failed_self_check_scores_whole_blocks_with_the_same_result():
    report = _run_worker([1, 2, 3], poison=True)
    assert set(report["modes"].values()) == {"whole_block"}, report["modes"]
    assert report["failures"] == []


def test_fast_path_verifies_here():
    # Without poisoning, this torch on this CPU takes the gathered path (if not, every
    # per-level block would be scored whole: correct but far slower).
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the loop layout is asserted for AVX2 / AVX512 only")
    assert ops.per_level_cpu_scoring() == "gathered"


def _level_config(activation: str, score_thresh: float, topk: int = 1000) -> PostprocessConfig:
    return PostprocessConfig(
        score_thresh=score_thresh,
        topk_candidates=topk,
        score_activation=activation,
        background_class=None,
        selection="per_level",
        box_coder="linear" if activation == "sigmoid_centerness" else "box",
    )


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@st.composite
def near_threshold_problems(draw):
    """Blocks of far-below logits with pairs whose score lies within 1% of
    score_thresh on both sides, or within a few float steps of its logit (scores
    one ULP or so from the threshold, some exactly on it). With centerness, one of
    the two sigmoids is saturated at exactly 1.0 and the other carries the score."""
    activation = draw(st.sampled_from(["sigmoid", "sigmoid_centerness"]))
    thresh = draw(st.sampled_from([0.05, 0.2, 0.3, 0.5, 0.8, 0.95]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    batch, classes, level_sizes = draw(st.integers(1, 2)), 8, [300, 75]
    anchors_n = sum(level_sizes)
    logits = torch.full((batch, anchors_n, classes), -12.0)
    centerness = torch.full((batch, anchors_n, 1), 20.0) if activation != "sigmoid" else None
    near = 40
    flat = torch.randperm(anchors_n * classes, generator=gen)[:near]
    relative = (torch.rand(near, generator=gen, dtype=torch.float64) * 2 - 1) * 0.01
    # The sigmoid that carries the score: the score itself, or its square when the
    # other factor of FCOS's sqrt(s * c) is 1.0.
    power = 1 if activation == "sigmoid" else 2
    carried = [_logit((thresh * (1 + float(r))) ** power) for r in relative]
    base = torch.tensor(_logit(thresh**power), dtype=torch.float32)
    for i in range(0, near, 4):  # every fourth pair: a few float steps off the logit
        steps = draw(st.integers(-3, 3))
        value = base
        toward = torch.tensor(math.inf if steps > 0 else -math.inf)
        for _ in range(abs(steps)):
            value = torch.nextafter(value, toward)
        carried[i] = float(value)
    carried = torch.tensor(carried, dtype=torch.float32)
    for b in range(batch):
        if centerness is not None and draw(st.booleans()):
            # The centerness carries the score: class logit saturated, one per anchor.
            anchors = flat // classes
            logits[b].view(-1)[flat] = 20.0
            centerness[b, anchors, 0] = carried
        else:
            logits[b].view(-1)[flat] = carried
    return logits, centerness, _level_config(activation, thresh), level_sizes


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(problem=near_threshold_problems())
def test_pairs_near_the_threshold_are_kept_exactly(problem):
    # Fails if the logit bound cuts a passing pair: e.g. with its 0.01 margin
    # (csrc/common/score_bounds.h kBoundMargin) flipped to cut 1% too much.
    logits, centerness, config, level_sizes = problem
    got = select_per_level(logits, centerness, config, level_sizes)
    want = reference.select_flat_loop(logits, centerness, config, level_sizes)
    score = want[3]
    assert bool(((score > config.score_thresh) & (score < config.score_thresh * 1.01)).any()), (
        "the problem should have passing scores within 1% of the threshold"
    )
    for name, g, w in zip(("image", "anchor", "label", "score"), got, want):
        assert torch.equal(g, w), f"{name} differs from the oracle"


@pytest.mark.parametrize(
    "level_sizes, classes, topk",
    [
        ([5], 1, 1),
        ([5], 3, 15),
        ([5], 3, 16),
        ([5, 0, 2], 3, 4),
        ([0, 0], 4, 10),
        ([7, 300, 9], 2, 1000),
        ([1] * 16, 5, 3),
        ([40, 10], 91, 2**40),
    ],
)
def test_python_capacity_equals_the_kernels(level_sizes, classes, topk):
    # ops.select_capacity (the fake kernel's slots) and common/select_params.h's
    # level_capacity (the CPU and CUDA kernels' slots) fed the same cases.
    logits = torch.zeros(1, sum(level_sizes), classes)
    flat, scores, counts = ops.select_topk_op(logits, None, level_sizes, 0.5, topk, None)
    k = ops.select_capacity(level_sizes, classes, topk)
    assert flat.shape == scores.shape == (1, len(level_sizes), k)
    assert counts.shape == (1, len(level_sizes))


def test_level_limit_is_the_shared_one():
    # common/select_params.h kMaxLevels, checked once in common/checks.h for CPU and CUDA.
    config = _level_config("sigmoid", 0.05)
    logits = torch.randn(1, 17, 3)
    image, _, _, _ = select_per_level(logits, None, config, [2] + [1] * 15)
    assert image.numel() > 0
    with pytest.raises(ValueError, match=r"level_sizes should have 1 to 16 levels, got 17"):
        select_per_level(logits, None, config, [1] * 17)
    with pytest.raises(ValueError, match=r"level_sizes should have 1 to 16 levels, got 17"):
        ssd_post.postprocess(
            torch.zeros(1, 17, 4),
            logits,
            torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(17, 1),
            [(8, 8)],
            config,
            level_sizes=[1] * 17,
        )


@pytest.mark.parametrize("with_centerness", [False, True])
def test_opcheck_select_per_level(with_centerness):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 60, 5, generator=gen) * 2
    centerness = torch.randn(2, 60, 1, generator=gen) if with_centerness else None
    torch.library.opcheck(
        torch.ops.ssd_post.select_topk.default, (logits, centerness, [40, 20], 0.2, 30, None)
    )


def test_select_per_level_inside_torch_compile_fullgraph():
    logits = torch.randn(2, 60, 5, generator=torch.Generator().manual_seed(5)) * 2

    def run(logits):
        return torch.ops.ssd_post.select_topk(logits, None, [40, 20], 0.2, 30, None)

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(logits), run(logits)):
        assert torch.equal(got, want)
