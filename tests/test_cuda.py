"""CUDA kernels: registration (wherever nvcc built them), CUDA == CPU, no host
synchronization and CUDA-graph capture.

The CUDA == CPU tests run twice: on the GPU where there is one (marked `cuda`),
and on the CPU through the CUDA emulator (tests/cuda_emulation), which compiles
the kernel headers of csrc/cuda with the host compiler. The comparison rules are
in cuda_parity.py.
"""

import os
import shutil
import subprocess

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuda_emulation
import ssd_post
from common_utils import CUDA_MARKS, needs_cuda
from cuda_parity import (
    BOX_TOL,
    PARITY_CASES,
    assert_flatten_match,
    assert_postprocess_match,
    make_inputs,
    make_nms_inputs,
    run_flatten,
    run_postprocess,
)
from ssd_post import PostprocessConfig
from ssd_post.reference import batched_nms_reference

OPS = ("decode_threshold_flatten", "batched_nms", "postprocess")


@pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="the CUDA kernels are built only with nvcc"
)
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssd_post::{op}", "CUDA")


class DeviceKernels:
    """The ops' CUDA kernels on the GPU; results come back on the CPU."""

    def postprocess(self, inputs, config):
        out = run_postprocess(inputs, config, "cuda")
        assert all(t.device.type == "cuda" for t in out)
        return tuple(t.cpu() for t in out)

    def flatten(self, inputs, config):
        out = run_flatten(inputs, config, "cuda")
        assert all(t.device.type == "cuda" for t in out)
        return tuple(t.cpu() for t in out)

    def batched_nms(self, boxes, scores, idxs, iou_threshold, max_kept=None, keys_per_image=None):
        out = torch.ops.ssd_post.batched_nms(
            boxes.cuda(), scores.cuda(), idxs.cuda(), iou_threshold, max_kept, keys_per_image
        )
        assert out.device.type == "cuda" and out.dtype == torch.int64
        return out.cpu()


class EmulatedKernels:
    """The same kernel code compiled for the CPU (tests/cuda_emulation)."""

    def postprocess(self, inputs, config):
        return cuda_emulation.postprocess(*inputs, config)

    def flatten(self, inputs, config):
        return cuda_emulation.decode_threshold_flatten(*inputs, config)

    def batched_nms(self, boxes, scores, idxs, iou_threshold, max_kept=None, keys_per_image=None):
        return cuda_emulation.batched_nms(
            boxes, scores, idxs, iou_threshold, max_kept, keys_per_image
        )


@pytest.fixture(params=[pytest.param("device", marks=CUDA_MARKS), "emulated"])
def kernels(request):
    """Each CUDA-vs-CPU test runs on the GPU where there is one, and always on the
    emulator, which needs only a host C++ compiler."""
    if request.param == "device":
        return DeviceKernels()
    if cuda_emulation.compiler() is None:
        pytest.skip("needs a C++ compiler to build the CUDA emulator")
    return EmulatedKernels()


def check_postprocess(kernels, inputs, config):
    out = kernels.postprocess(inputs, config)
    assert_postprocess_match(run_postprocess(inputs, config, "cpu"), out)
    return out


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
# B = 3 repeats every case with several images per launch: slow on the emulator.
@pytest.mark.parametrize("batch", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_postprocess_cuda_equals_cpu(kernels, case, batch):
    input_kwargs, config_kwargs = PARITY_CASES[case]
    inputs = make_inputs(batch, 700, 7, seed=batch, **input_kwargs)
    check_postprocess(kernels, inputs, PostprocessConfig(**config_kwargs))


@pytest.mark.slow  # about 10 s each on the emulator
@pytest.mark.parametrize("anchors", [8732, 12000])  # keys cached in shared memory, then recomputed
def test_postprocess_ssd300_shapes(kernels, anchors):
    inputs = make_inputs(2, anchors, 91 if anchors == 8732 else 5, seed=7)
    out = check_postprocess(kernels, inputs, PostprocessConfig())
    assert int(out[3].min()) > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_postprocess_half_inputs(kernels, dtype):
    locs, logits, anchors, sizes = make_inputs(2, 900, 11, seed=3)
    inputs = (locs.to(dtype), logits.to(dtype), anchors, sizes)
    check_postprocess(kernels, inputs, PostprocessConfig(topk_candidates=60))


def test_ties_broken_by_lower_anchor_and_class(kernels):
    # Equal scores only where both devices must produce the same bits: softmax
    # rows that are exact copies (same values, same summation order), sigmoid
    # logits on a coarse grid. Copied anchors and regressions make the tied
    # candidates identical boxes too, so NMS keeps exactly one of each pair.
    locs, logits, anchors, sizes = make_inputs(2, 1500, 5, seed=11)
    logits[:, 1::2] = logits[:, 0::2]
    locs[:, 1::2] = locs[:, 0::2]
    anchors[1::2] = anchors[0::2]
    check_postprocess(
        kernels,
        (locs, logits, anchors, sizes),
        PostprocessConfig(topk_candidates=37, detections_per_img=50),
    )
    check_postprocess(
        kernels,
        (locs, logits, anchors, sizes),
        PostprocessConfig(topk_candidates=400, nms_thresh=1.0, detections_per_img=900),
    )
    grid_logits = torch.round(logits * 2) / 2
    check_postprocess(
        kernels,
        (locs, grid_logits, anchors, sizes),
        PostprocessConfig(
            score_activation="sigmoid", background_class=None, topk_candidates=100, score_thresh=0.5
        ),
    )


def test_all_equal_scores_take_lowest_anchors(kernels):
    locs, logits, anchors, sizes = make_inputs(1, 3000, 2, seed=5)
    logits = torch.ones_like(logits)
    config = PostprocessConfig(
        score_activation="sigmoid",
        background_class=None,
        topk_candidates=100,
        nms_thresh=1.0,
        detections_per_img=300,
    )
    check_postprocess(kernels, (locs, logits, anchors, sizes), config)
    flat_c = run_flatten((locs, logits, anchors, sizes), config, "cpu")
    flat_g = kernels.flatten((locs, logits, anchors, sizes), config)
    assert_flatten_match(flat_c, flat_g)
    # Every score is the same bits: the lowest 100 anchors, in anchor order.
    torch.testing.assert_close(flat_g[0], flat_c[0], **BOX_TOL)


def test_nan_and_inf_logits(kernels):
    locs, logits, anchors, sizes = make_inputs(2, 800, 6, seed=13)
    logits[0, 3, 2] = float("nan")
    logits[0, 10, :] = float("nan")
    logits[1, 5, 4] = float("inf")
    logits[1, 6, :] = float("-inf")
    logits[1, 7, 1] = float("-inf")
    locs[0, 20, 2] = float("nan")
    for activation, background in (("softmax", 0), ("sigmoid", None)):
        config = PostprocessConfig(score_activation=activation, background_class=background)
        check_postprocess(kernels, (locs, logits, anchors, sizes), config)


@pytest.mark.parametrize(
    "config",
    [
        PostprocessConfig(),
        PostprocessConfig(topk_candidates=9),
        PostprocessConfig(score_activation="sigmoid", background_class=None, score_thresh=0.4),
    ],
)
def test_decode_threshold_flatten_cuda_equals_cpu(kernels, config):
    inputs = make_inputs(3, 1000, 9, seed=17)
    assert_flatten_match(run_flatten(inputs, config, "cpu"), kernels.flatten(inputs, config))


# Sizes on either side of the kernels' 64-row NMS chunks and 256-thread blocks.
BLOCK_EDGES = [1, 2, 63, 64, 65, 127, 128, 129, 255, 256, 257]


@st.composite
def kernel_problems(draw):
    """Shapes around the kernels' block sizes (64-row NMS chunks, 256-thread scans)
    and every setting; continuous seeded logits for softmax, a coarse grid (exact
    ties, same bits on every backend) for sigmoid."""
    batch, classes = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    anchors = draw(st.sampled_from(BLOCK_EDGES) | st.integers(1, 300))
    activation = draw(st.sampled_from(["softmax", "sigmoid"]))
    inputs = make_inputs(
        batch,
        anchors,
        classes,
        seed=draw(st.integers(0, 2**16)),
        per_image_anchors=draw(st.booleans()),
        logit_scale=draw(st.sampled_from([1.0, 3.0])),
    )
    locs, logits, anchors, sizes = inputs
    if activation == "sigmoid":
        logits = torch.round(logits * 2) / 2
    # Anchors packed into a corner overlap a lot: NMS suppresses across chunks.
    anchors = anchors * draw(st.sampled_from([1.0, 0.1]))
    config = PostprocessConfig(
        score_thresh=draw(st.sampled_from([0.0, 0.01, 0.2, 0.6])),
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
        topk_candidates=draw(st.sampled_from(BLOCK_EDGES) | st.integers(1, 130)),
        detections_per_img=draw(st.integers(1, 150)),
        score_activation=activation,
        background_class=draw(st.sampled_from([None] + list(range(classes)))),
        clip_boxes=draw(st.booleans()),
    )
    return (locs, logits, anchors, sizes), config


# Derandomized: CPU and CUDA softmax scores may differ by an ULP, so a new random
# draw could, rarely, flip two near-equal overlapping boxes in NMS; the same
# 100 examples every run keep the suite deterministic.
@pytest.mark.slow
@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(problem=kernel_problems())
def test_postprocess_and_flatten_match_cpu_on_random_problems(kernels, problem):
    inputs, config = problem
    check_postprocess(kernels, inputs, config)
    assert_flatten_match(run_flatten(inputs, config, "cpu"), kernels.flatten(inputs, config))


@pytest.mark.parametrize("n,groups", [(1, 1), (300, 1), (2000, 37), (5000, 500)])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 1.0])
def test_batched_nms_cuda_equals_cpu(kernels, n, groups, iou_threshold):
    boxes, scores, idxs = make_nms_inputs(n, groups, seed=n + groups)
    cpu = torch.ops.ssd_post.batched_nms(boxes, scores, idxs, iou_threshold)
    torch.testing.assert_close(
        kernels.batched_nms(boxes, scores, idxs, iou_threshold), cpu, rtol=0, atol=0
    )


@pytest.mark.parametrize("max_kept", [0, 1, 5, 70, 200])
@pytest.mark.parametrize("groups, keys_per_image", [(1, None), (37, None), (37, 5), (36, 36)])
def test_batched_nms_max_kept_is_the_full_nms_truncated(kernels, max_kept, groups, keys_per_image):
    # 64-box chunks of the kernel: limits inside the first chunk, at a later one and
    # past the survivor count; per group and per image (floor(idx / keys_per_image)).
    boxes, scores, idxs = make_nms_inputs(3000, groups, seed=max_kept + groups)
    expected = batched_nms_reference(boxes, scores, idxs, 0.3, max_kept, keys_per_image)
    actual = kernels.batched_nms(boxes, scores, idxs, 0.3, max_kept, keys_per_image)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    cpu = torch.ops.ssd_post.batched_nms(boxes, scores, idxs, 0.3, max_kept, keys_per_image)
    torch.testing.assert_close(actual, cpu, rtol=0, atol=0)


def test_batched_nms_max_kept_with_negative_keys(kernels):
    boxes, scores, idxs = make_nms_inputs(800, 12, seed=4)
    idxs = idxs - 6  # images -2 .. 1 with keys_per_image = 3: floor division
    for max_kept, keys_per_image in ((3, None), (4, 3)):
        expected = batched_nms_reference(boxes, scores, idxs, 0.5, max_kept, keys_per_image)
        actual = kernels.batched_nms(boxes, scores, idxs, 0.5, max_kept, keys_per_image)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_batched_nms_nan_negative_zero_and_float64_scores(kernels):
    boxes, scores, idxs = make_nms_inputs(400, 4, seed=1)
    scores = scores.double()
    scores[::7] = float("nan")
    scores[3::11] = -0.0
    scores[5::13] = 0.0
    scores[2::17] = float("inf")
    scores[6::19] = 0.5 + 1e-12  # differs from 0.5 in float64 only
    cpu = torch.ops.ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    torch.testing.assert_close(kernels.batched_nms(boxes, scores, idxs, 0.5), cpu, rtol=0, atol=0)


def test_empty_inputs(kernels):
    config = PostprocessConfig(detections_per_img=5)
    for batch, anchors in ((0, 100), (2, 0)):
        out = kernels.postprocess(make_inputs(batch, anchors, 4), config)
        k = config.padded_detections(anchors, 4)  # 0 without anchors
        assert k == (5 if anchors else 0)
        assert [tuple(t.shape) for t in out] == [
            (batch, k, 4),
            (batch, k),
            (batch, k),
            (batch,),
            (batch, k),
        ]
        assert not any(t.any() for t in out[:4])
        assert bool((out[4] == -1).all())
        flat = kernels.flatten(make_inputs(batch, anchors, 4), config)
        assert [tuple(t.shape) for t in flat] == [(0, 4), (0,), (0,)]
    nothing_passes = PostprocessConfig(score_thresh=1.0)
    check_postprocess(kernels, make_inputs(2, 300, 4), nothing_passes)
    empty = kernels.batched_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5
    )
    assert empty.shape == (0,)


@needs_cuda
def test_postprocess_does_not_synchronize():
    locs, logits, anchors, sizes = (t.cuda() for t in make_inputs(4, 2000, 21, seed=2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        det = ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert det.boxes.shape == (4, 200, 4)


@needs_cuda
def test_cpu_image_sizes_with_cuda_inputs_are_checked_then_used():
    """The one image-size contract (csrc/common/op_inputs.h): CPU sizes are checked
    on the host and copied over; fractions are truncated on every device."""
    inputs = make_inputs(2, 500, 5, seed=4)
    locs, logits, anchors = (t.cuda() for t in inputs[:3])
    fractional = inputs[3].float() + 0.75
    config = PostprocessConfig()
    expected = run_postprocess(inputs, config, "cpu")

    def on_cuda(sizes):  # the op itself: run_postprocess would move the sizes too
        return torch.ops.ssd_post.postprocess(
            locs,
            logits,
            anchors,
            sizes,
            config.score_thresh,
            config.nms_thresh,
            config.topk_candidates,
            config.detections_per_img,
            list(config.box_weights),
            config.score_activation,
            config.background_class,
            config.clip_boxes,
        )

    for sizes in (inputs[3], fractional, fractional.cuda()):
        assert_postprocess_match(expected, on_cuda(sizes))
    bad = fractional.clone()
    bad[1, 0] = 0.5
    with pytest.raises(RuntimeError, match="image_sizes should hold positive finite"):
        on_cuda(bad)


@needs_cuda
def test_postprocess_cuda_graph_capture_and_replay():
    config = PostprocessConfig(topk_candidates=50, detections_per_img=40)
    first = [t.cuda() for t in make_inputs(2, 1200, 8, seed=21)]
    second = [t.cuda() for t in make_inputs(2, 1200, 8, seed=22)]
    static = [t.clone() for t in first]

    def step():
        return torch.ops.ssd_post.postprocess(
            *static,
            config.score_thresh,
            config.nms_thresh,
            config.topk_candidates,
            config.detections_per_img,
            list(config.box_weights),
            config.score_activation,
            config.background_class,
            config.clip_boxes,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up the allocator outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for inputs in (first, second, first):
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert_postprocess_match(
            run_postprocess([t.cpu() for t in inputs], config, "cpu"), captured
        )


@pytest.mark.slow  # builds and runs an instrumented binary
@pytest.mark.skipif(cuda_emulation.compiler() is None, reason="needs a C++ compiler")
def test_emulated_kernels_under_address_and_ub_sanitizers():
    """The emulated kernels on seeded problems (radix select, uncached keys, NaN and
    inf, nothing passing, everything kept) with every buffer exactly sized: any
    out-of-bounds index or undefined operation in a kernel aborts with a report."""
    runner = cuda_emulation.sanitized_runner()
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([str(runner)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.strip().endswith("ok")
    assert "AddressSanitizer" not in result.stderr.replace("ASan doesn't fully support", "")
