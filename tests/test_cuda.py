"""CUDA kernels: registration (wherever nvcc built them) and CUDA == CPU (on a GPU).

The CUDA scores are exp(x - max) * (1 / sum) with the device's expf and summation
order, the CPU scores come from torch's CPU softmax: they may differ by float
rounding (a few ULPs), and boxes too through expf. So scores and boxes are compared
with tight tolerances, and labels, counts, keys and kept indices exactly.
"""
import shutil

import pytest
import torch

import ssd_post
from ssd_post import PostprocessConfig

OPS = ("decode_threshold_flatten", "batched_nms", "postprocess")



def needs_gpu(test):
    """Marks a test `cuda` and skips it where no CUDA device is present."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(test))


SCORE_TOL = dict(rtol=1e-5, atol=1e-7)
BOX_TOL = dict(rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="the CUDA kernels are built only with nvcc")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssd_post::{op}", "CUDA")


def make_inputs(batch, anchors, classes, seed=0, per_image_anchors=False, logit_scale=1.0):
    """locs [B, A, 4], logits [B, A, C], xyxy anchors [A, 4] (or [B, A, 4]) and
    image sizes [B, 2], on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    locs = torch.randn(batch, anchors, 4, generator=gen) * 0.5
    logits = torch.randn(batch, anchors, classes, generator=gen) * logit_scale
    shape = (batch, anchors) if per_image_anchors else (anchors,)
    centers = torch.rand(*shape, 2, generator=gen) * 300
    sizes = torch.rand(*shape, 2, generator=gen) * 90 + 10
    anchor_boxes = torch.cat((centers - sizes / 2, centers + sizes / 2), dim=-1)
    image_sizes = torch.tensor([[300, 300]] * batch, dtype=torch.int64).reshape(batch, 2)
    if batch > 1:
        image_sizes[1] = torch.tensor([240, 320])
    return locs, logits, anchor_boxes, image_sizes


def run_postprocess(inputs, config, device):
    locs, logits, anchors, sizes = (t.to(device) for t in inputs)
    return torch.ops.ssd_post.postprocess(
        locs, logits, anchors, sizes, config.score_thresh, config.nms_thresh,
        config.topk_candidates, config.detections_per_img, list(config.box_weights),
        config.score_activation, config.background_class, config.clip_boxes)


def run_flatten(inputs, config, device):
    locs, logits, anchors, sizes = (t.to(device) for t in inputs)
    return torch.ops.ssd_post.decode_threshold_flatten(
        locs, logits, anchors, sizes, config.score_thresh, config.topk_candidates,
        list(config.box_weights), config.score_activation, config.background_class,
        config.clip_boxes)


# Scores of distinct candidates can lie one ULP apart, so a few ULPs of rounding
# may swap two neighbours between CPU and CUDA; inside a run of such near-equal
# (but not bit-equal) scores the rows are compared as sets.
NEAR_TIE = 1e-6


def assert_ranked_rows_match(cpu_scores, gpu_scores, cpu_labels, gpu_labels, cpu_boxes, gpu_boxes):
    """Rows ranked by score: scores close position by position, labels and boxes
    equal position by position, except inside runs of near-equal scores, where
    each CUDA row must match a distinct CPU row of the run. Runs of bit-equal scores
    (exact ties) are compared position by position, so tie-breaking is checked."""
    torch.testing.assert_close(gpu_scores, cpu_scores, **SCORE_TOL)
    cs, gs = cpu_scores.tolist(), gpu_scores.tolist()
    cl, gl = cpu_labels.tolist(), gpu_labels.tolist()
    n, start = len(cs), 0
    for end in range(1, n + 1):
        if end < n and cs[end - 1] - cs[end] <= NEAR_TIE * abs(cs[end - 1]):
            continue
        run = range(start, end)
        exact_tie = len(set(cs[start:end])) == 1 and len(set(gs[start:end])) == 1
        if exact_tie:
            assert gl[start:end] == cl[start:end], f"rows {start}..{end - 1}: labels differ"
            torch.testing.assert_close(gpu_boxes[start:end], cpu_boxes[start:end], **BOX_TOL)
        else:
            unused = list(run)
            for g in run:
                match = next((c for c in unused if cl[c] == gl[g] and torch.allclose(
                    gpu_boxes[g], cpu_boxes[c], **BOX_TOL)), None)
                assert match is not None, f"row {g} (label {gl[g]}) has no CPU counterpart in {run}"
                unused.remove(match)
        start = end


def assert_postprocess_match(cpu, gpu):
    boxes_c, scores_c, labels_c, counts_c = cpu
    boxes_g, scores_g, labels_g, counts_g = (t.cpu() for t in gpu)
    assert boxes_g.shape == boxes_c.shape and labels_g.dtype == torch.int64
    torch.testing.assert_close(counts_g, counts_c, rtol=0, atol=0)
    for image, n in enumerate(counts_c.tolist()):
        assert_ranked_rows_match(scores_c[image, :n], scores_g[image, :n], labels_c[image, :n],
                                 labels_g[image, :n], boxes_c[image, :n], boxes_g[image, :n])
        # Padding is zero.
        assert not (boxes_g[image, n:].any() or scores_g[image, n:].any() or labels_g[image, n:].any())


def assert_flatten_match(cpu, gpu):
    """Keys (segment sizes) exactly; each segment as ranked rows."""
    boxes_c, scores_c, keys_c = cpu
    boxes_g, scores_g, keys_g = (t.cpu() for t in gpu)
    torch.testing.assert_close(keys_g, keys_c, rtol=0, atol=0)
    for key in keys_c.unique().tolist():
        rows = (keys_c == key).nonzero().flatten()
        assert_ranked_rows_match(scores_c[rows], scores_g[rows], keys_c[rows], keys_g[rows],
                                 boxes_c[rows], boxes_g[rows])


def check_postprocess(inputs, config):
    cpu = run_postprocess(inputs, config, "cpu")
    gpu = run_postprocess(inputs, config, "cuda")
    assert_postprocess_match(cpu, gpu)
    return gpu


PARITY_CASES = {
    "torchvision_defaults": (dict(), dict()),
    "few_candidates_radix_select": (dict(), dict(topk_candidates=5, detections_per_img=20)),
    "sigmoid_no_background": (
        dict(), dict(score_activation="sigmoid", background_class=None, score_thresh=0.3)),
    "background_last_no_clip": (dict(), dict(background_class=6, clip_boxes=False)),
    "per_image_anchors": (dict(per_image_anchors=True), dict(nms_thresh=0.3)),
    "threshold_zero": (dict(), dict(score_thresh=0.0, topk_candidates=50, detections_per_img=30)),
    "nms_off_and_all": (dict(), dict(nms_thresh=1.0, detections_per_img=1000)),
    "nms_everything": (dict(), dict(nms_thresh=0.0)),
    "sharp_logits": (dict(logit_scale=4.0), dict(score_thresh=0.2)),
}


@needs_gpu
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
@pytest.mark.parametrize("batch", [1, 3])
def test_postprocess_cuda_equals_cpu(case, batch):
    input_kwargs, config_kwargs = PARITY_CASES[case]
    inputs = make_inputs(batch, 700, 7, seed=batch, **input_kwargs)
    check_postprocess(inputs, PostprocessConfig(**config_kwargs))


@needs_gpu
@pytest.mark.parametrize("anchors", [8732, 12000])  # keys cached in shared memory, then recomputed
def test_postprocess_ssd300_shapes(anchors):
    inputs = make_inputs(2, anchors, 91 if anchors == 8732 else 5, seed=7)
    out = check_postprocess(inputs, PostprocessConfig())
    assert int(out[3].min()) > 0


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_postprocess_half_inputs(dtype):
    locs, logits, anchors, sizes = make_inputs(2, 900, 11, seed=3)
    inputs = (locs.to(dtype), logits.to(dtype), anchors, sizes)
    check_postprocess(inputs, PostprocessConfig(topk_candidates=60))


@needs_gpu
def test_ties_broken_by_lower_anchor_and_class():
    # Equal scores only where both devices must produce the same bits: softmax
    # rows that are exact copies (same values, same summation order), sigmoid
    # logits on a coarse grid. Copied anchors and regressions make the tied
    # candidates identical boxes too, so NMS keeps exactly one of each pair.
    locs, logits, anchors, sizes = make_inputs(2, 1500, 5, seed=11)
    logits[:, 1::2] = logits[:, 0::2]
    locs[:, 1::2] = locs[:, 0::2]
    anchors[1::2] = anchors[0::2]
    check_postprocess((locs, logits, anchors, sizes),
                      PostprocessConfig(topk_candidates=37, detections_per_img=50))
    check_postprocess((locs, logits, anchors, sizes),
                      PostprocessConfig(topk_candidates=400, nms_thresh=1.0, detections_per_img=900))
    grid_logits = torch.round(logits * 2) / 2
    check_postprocess((locs, grid_logits, anchors, sizes),
                      PostprocessConfig(score_activation="sigmoid", background_class=None,
                                        topk_candidates=100, score_thresh=0.5))


@needs_gpu
def test_all_equal_scores_take_lowest_anchors():
    locs, logits, anchors, sizes = make_inputs(1, 3000, 2, seed=5)
    logits = torch.ones_like(logits)
    config = PostprocessConfig(score_activation="sigmoid", background_class=None,
                               topk_candidates=100, nms_thresh=1.0, detections_per_img=300)
    check_postprocess((locs, logits, anchors, sizes), config)
    flat_c = run_flatten((locs, logits, anchors, sizes), config, "cpu")
    flat_g = run_flatten((locs, logits, anchors, sizes), config, "cuda")
    assert_flatten_match(flat_c, flat_g)
    # Every score is the same bits: the lowest 100 anchors, in anchor order.
    torch.testing.assert_close(flat_g[0].cpu(), flat_c[0], **BOX_TOL)


@needs_gpu
def test_nan_and_inf_logits():
    locs, logits, anchors, sizes = make_inputs(2, 800, 6, seed=13)
    logits[0, 3, 2] = float("nan")
    logits[0, 10, :] = float("nan")
    logits[1, 5, 4] = float("inf")
    logits[1, 6, :] = float("-inf")
    logits[1, 7, 1] = float("-inf")
    locs[0, 20, 2] = float("nan")
    for activation, background in (("softmax", 0), ("sigmoid", None)):
        config = PostprocessConfig(score_activation=activation, background_class=background)
        check_postprocess((locs, logits, anchors, sizes), config)


@needs_gpu
@pytest.mark.parametrize("config", [PostprocessConfig(), PostprocessConfig(topk_candidates=9),
                                    PostprocessConfig(score_activation="sigmoid",
                                                      background_class=None, score_thresh=0.4)])
def test_decode_threshold_flatten_cuda_equals_cpu(config):
    inputs = make_inputs(3, 1000, 9, seed=17)
    assert_flatten_match(run_flatten(inputs, config, "cpu"), run_flatten(inputs, config, "cuda"))


def make_nms_inputs(n, groups, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = torch.rand(n, 2, generator=gen) * 30
    boxes = torch.cat((xy, xy + wh), dim=1)
    # Every tenth box a near copy of its predecessor, just past typical thresholds.
    boxes[1::10] = boxes[0::10][: boxes[1::10].shape[0]] + 0.5
    scores = torch.round(torch.rand(n, generator=gen) * 50) / 50  # many ties
    idxs = torch.randint(0, groups, (n,), generator=gen)
    return boxes.to(dtype), scores.to(dtype), idxs


@needs_gpu
@pytest.mark.parametrize("n,groups", [(1, 1), (300, 1), (2000, 37), (5000, 500)])
@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 1.0])
def test_batched_nms_cuda_equals_cpu(n, groups, iou_threshold):
    boxes, scores, idxs = make_nms_inputs(n, groups, seed=n + groups)
    cpu = torch.ops.ssd_post.batched_nms(boxes, scores, idxs, iou_threshold)
    gpu = torch.ops.ssd_post.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), iou_threshold)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.int64
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


@needs_gpu
def test_batched_nms_nan_negative_zero_and_float64_scores():
    boxes, scores, idxs = make_nms_inputs(400, 4, seed=1)
    scores = scores.double()
    scores[::7] = float("nan")
    scores[3::11] = -0.0
    scores[5::13] = 0.0
    scores[2::17] = float("inf")
    scores[6::19] = 0.5 + 1e-12  # differs from 0.5 in float64 only
    cpu = torch.ops.ssd_post.batched_nms(boxes, scores, idxs, 0.5)
    gpu = torch.ops.ssd_post.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)


@needs_gpu
def test_empty_inputs():
    config = PostprocessConfig(detections_per_img=5)
    for batch, anchors in ((0, 100), (2, 0)):
        out = run_postprocess(make_inputs(batch, anchors, 4), config, "cuda")
        assert [tuple(t.shape) for t in out] == [(batch, 5, 4), (batch, 5), (batch, 5), (batch,)]
        assert all(t.device.type == "cuda" and not t.any() for t in out)
        flat = run_flatten(make_inputs(batch, anchors, 4), config, "cuda")
        assert [tuple(t.shape) for t in flat] == [(0, 4), (0,), (0,)]
    nothing_passes = PostprocessConfig(score_thresh=1.0)
    check_postprocess(make_inputs(2, 300, 4), nothing_passes)
    empty = torch.ops.ssd_post.batched_nms(torch.zeros(0, 4, device="cuda"),
                                           torch.zeros(0, device="cuda"),
                                           torch.zeros(0, dtype=torch.int64, device="cuda"), 0.5)
    assert empty.shape == (0,) and empty.device.type == "cuda"


@needs_gpu
def test_postprocess_does_not_synchronize():
    locs, logits, anchors, sizes = (t.cuda() for t in make_inputs(4, 2000, 21, seed=2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        det = ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert det.boxes.shape == (4, 200, 4)


@needs_gpu
def test_postprocess_cuda_graph_capture_and_replay():
    config = PostprocessConfig(topk_candidates=50, detections_per_img=40)
    first = [t.cuda() for t in make_inputs(2, 1200, 8, seed=21)]
    second = [t.cuda() for t in make_inputs(2, 1200, 8, seed=22)]
    static = [t.clone() for t in first]

    def step():
        return torch.ops.ssd_post.postprocess(
            *static, config.score_thresh, config.nms_thresh, config.topk_candidates,
            config.detections_per_img, list(config.box_weights), config.score_activation,
            config.background_class, config.clip_boxes)

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
        assert_postprocess_match(run_postprocess([t.cpu() for t in inputs], config, "cpu"),
                                 captured)
