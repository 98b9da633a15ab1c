"""What the CUDA tests and the emulated-kernel tests share: the input generators,
the parity cases, and the comparison of CUDA-kernel outputs with the CPU kernels'.

The CUDA scores are exp(x - max) * (1 / sum) with the device's expf and summation
order, the CPU scores come from torch's CPU softmax: they may differ by float
rounding (a few ULPs), and boxes too through expf. So scores and boxes are compared
with tight tolerances, and labels, counts, keys and kept indices exactly.
"""

from __future__ import annotations

import torch

SCORE_TOL = dict(rtol=1e-5, atol=1e-7)
BOX_TOL = dict(rtol=1e-5, atol=1e-4)


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


def run_flatten(inputs, config, device):
    locs, logits, anchors, sizes = (t.to(device) for t in inputs)
    return torch.ops.ssd_post.decode_threshold_flatten(
        locs,
        logits,
        anchors,
        sizes,
        config.score_thresh,
        config.topk_candidates,
        list(config.box_weights),
        config.score_activation,
        config.background_class,
        config.clip_boxes,
    )


# Scores of distinct candidates can lie one ULP apart, so a few ULPs of rounding
# may swap two neighbours between CPU and CUDA; inside a run of such near-equal
# (but not bit-equal) scores the rows are compared as sets.
NEAR_TIE = 1e-6


def assert_ranked_rows_match(
    cpu_scores, gpu_scores, cpu_labels, gpu_labels, cpu_boxes, gpu_boxes, cpu_ids=None, gpu_ids=None
):
    """Rows ranked by score: scores close position by position, labels and boxes
    equal position by position, except inside runs of near-equal scores, where
    each CUDA row must match a distinct CPU row of the run. Runs of bit-equal scores
    (exact ties) are compared position by position, so tie-breaking is checked.
    ``cpu_ids`` / ``gpu_ids`` (anchor indices, optional) must match like labels."""
    torch.testing.assert_close(gpu_scores, cpu_scores, **SCORE_TOL)
    cs, gs = cpu_scores.tolist(), gpu_scores.tolist()
    if cpu_ids is not None:
        # A row's identity is its (label, anchor) pair.
        cpu_labels = torch.stack((cpu_labels, cpu_ids), dim=-1)
        gpu_labels = torch.stack((gpu_labels, gpu_ids), dim=-1)
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
                match = next(
                    (
                        c
                        for c in unused
                        if cl[c] == gl[g] and torch.allclose(gpu_boxes[g], cpu_boxes[c], **BOX_TOL)
                    ),
                    None,
                )
                assert match is not None, f"row {g} (label {gl[g]}) has no CPU counterpart in {run}"
                unused.remove(match)
        start = end


def assert_postprocess_match(cpu, gpu):
    """The outputs of postprocess (boxes, scores, labels, counts and, on both sides or
    neither, anchor indices): counts exactly, rows as ranked rows (label and anchor
    index exact), padding zero (anchor index -1)."""
    if len(cpu) != len(gpu) or len(cpu) not in (4, 5):
        raise ValueError(f"expected 4 or 5 outputs on both sides, got {len(cpu)} and {len(gpu)}")
    boxes_c, scores_c, labels_c, counts_c = cpu[:4]
    boxes_g, scores_g, labels_g, counts_g = (t.cpu() for t in gpu[:4])
    anchors_c = cpu[4] if len(cpu) == 5 else None
    anchors_g = gpu[4].cpu() if len(gpu) == 5 else None
    assert boxes_g.shape == boxes_c.shape and labels_g.dtype == torch.int64
    if anchors_g is not None:
        assert anchors_g.shape == anchors_c.shape and anchors_g.dtype == torch.int64
    torch.testing.assert_close(counts_g, counts_c, rtol=0, atol=0)
    for image, n in enumerate(counts_c.tolist()):
        assert_ranked_rows_match(
            scores_c[image, :n],
            scores_g[image, :n],
            labels_c[image, :n],
            labels_g[image, :n],
            boxes_c[image, :n],
            boxes_g[image, :n],
            None if anchors_c is None else anchors_c[image, :n],
            None if anchors_g is None else anchors_g[image, :n],
        )
        # Padding is zero, its anchor index -1.
        assert not (
            boxes_g[image, n:].any() or scores_g[image, n:].any() or labels_g[image, n:].any()
        )
        if anchors_g is not None:
            assert bool((anchors_g[image, n:] == -1).all())


def assert_flatten_match(cpu, gpu):
    """Keys (segment sizes) exactly; each segment as ranked rows."""
    boxes_c, scores_c, keys_c = cpu
    boxes_g, scores_g, keys_g = (t.cpu() for t in gpu)
    torch.testing.assert_close(keys_g, keys_c, rtol=0, atol=0)
    for key in keys_c.unique().tolist():
        rows = (keys_c == key).nonzero().flatten()
        assert_ranked_rows_match(
            scores_c[rows], scores_g[rows], keys_c[rows], keys_g[rows], boxes_c[rows], boxes_g[rows]
        )


PARITY_CASES = {
    "torchvision_defaults": (dict(), dict()),
    "few_candidates_radix_select": (dict(), dict(topk_candidates=5, detections_per_img=20)),
    "sigmoid_no_background": (
        dict(),
        dict(score_activation="sigmoid", background_class=None, score_thresh=0.3),
    ),
    "background_last_no_clip": (dict(), dict(background_class=6, clip_boxes=False)),
    "per_image_anchors": (dict(per_image_anchors=True), dict(nms_thresh=0.3)),
    "threshold_zero": (dict(), dict(score_thresh=0.0, topk_candidates=50, detections_per_img=30)),
    "nms_off_and_all": (dict(), dict(nms_thresh=1.0, detections_per_img=1000)),
    "nms_everything": (dict(), dict(nms_thresh=0.0)),
    "sharp_logits": (dict(logit_scale=4.0), dict(score_thresh=0.2)),
}


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
