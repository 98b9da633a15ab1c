"""anchor_indices of the fused SSD op (``ssd_post::postprocess``, its 5th output,
``Detections.anchor_indices``): each detection names the anchor row it came from.

Checked two ways: against the oracle (reference.postprocess_loop, which keeps the
anchor of every candidate it selects), and independently of any oracle, by decoding
the named anchor again and scoring its logits again: the detection's box must be
decode(locs[b, anchor], anchors[anchor]) (clipped) and its score the activated
logit at [b, anchor, label]. On the CPU kernel and through the CUDA emulator (the
kernels of csrc/cuda compiled for the CPU).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import cuda_emulation
import ssd_post
from cuda_parity import assert_postprocess_match, make_inputs, run_postprocess
from ssd_post import PostprocessConfig, reference
from ssd_post.box_coder import BoxCoder, clip_boxes
from test_postprocess_properties import problems

needs_emulator = pytest.mark.skipif(
    cuda_emulation.compiler() is None, reason="needs a C++ compiler to build the CUDA emulator"
)

SSD_CONFIGS = {
    "softmax": PostprocessConfig(topk_candidates=60, detections_per_img=1000),
    "sigmoid": PostprocessConfig(
        score_activation="sigmoid",
        background_class=None,
        score_thresh=0.3,
        topk_candidates=60,
        detections_per_img=1000,
    ),
}


def assert_anchor_indices_consistent(
    det: ssd_post.Detections,
    locs: torch.Tensor,
    logits: torch.Tensor,
    anchors: torch.Tensor,
    image_sizes: torch.Tensor,
    config: PostprocessConfig,
    score_rtol: float = 1e-6,
    box_atol: float = 1e-3,
) -> None:
    """anchor_indices is [B, K] int64, -1 exactly in the padding rows, and each
    detection's box and score are those of its anchor, decoded and scored anew.

    Args:
        locs (Tensor[B, A, 4]), logits (Tensor[B, A, C]), anchors (Tensor[A, 4] or
        Tensor[B, A, 4]), image_sizes (Tensor[B, 2] (h, w)); SSD's softmax or sigmoid
        scores.
    """
    batch, num_anchors, _ = logits.shape
    index = det.anchor_indices
    assert index is not None
    assert index.dtype == torch.int64
    assert index.shape == det.scores.shape == (batch, det.scores.shape[1])
    valid = torch.arange(index.shape[1]) < det.num_detections[:, None]
    assert bool((index[~valid] == -1).all()), "padding rows should hold -1"
    image, row = valid.nonzero(as_tuple=True)
    anchor = index[image, row]
    assert bool(((anchor >= 0) & (anchor < num_anchors)).all())

    coder = BoxCoder(config.box_weights)
    box_anchors = anchors[anchor] if anchors.dim() == 2 else anchors[image, anchor]
    boxes = coder.decode(locs[image, anchor].float(), box_anchors.float())
    if config.clip_boxes:
        hw = image_sizes[image].float()
        boxes = clip_boxes(boxes, (hw[:, 0:1], hw[:, 1:2]))
    torch.testing.assert_close(det.boxes[image, row], boxes, rtol=0, atol=box_atol)

    row_logits = logits[image, anchor].float()
    scores = (
        row_logits.softmax(-1) if config.score_activation == "softmax" else row_logits.sigmoid()
    )
    labels = det.labels[image, row]
    expected = scores.gather(1, labels[:, None]).squeeze(1)
    torch.testing.assert_close(det.scores[image, row], expected, rtol=score_rtol, atol=0)


def _emulated(locs, logits, anchors, sizes, config) -> ssd_post.Detections:
    """ssd_post.postprocess's Detections from the emulated CUDA op."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64).reshape(logits.shape[0], 2)
    return ssd_post.Detections(*cuda_emulation.postprocess(locs, logits, anchors, sizes, config))


# ----------------------------------------------------------------------------- SSD


@pytest.mark.parametrize("activation", sorted(SSD_CONFIGS))
@pytest.mark.parametrize("per_image_anchors", [False, True])
@pytest.mark.parametrize("batch", [1, 3])  # anchors split over threads; one image per thread
def test_ssd_cpu(activation, per_image_anchors, batch):
    config = SSD_CONFIGS[activation]
    locs, logits, anchors, sizes = make_inputs(
        batch, 700, 7, seed=batch, per_image_anchors=per_image_anchors
    )
    det = ssd_post.postprocess(locs, logits, anchors, sizes, config)
    assert int(det.num_detections.min()) > 0
    assert bool((det.num_detections < det.scores.shape[1]).any())  # some padding to check
    assert_anchor_indices_consistent(det, locs, logits, anchors, sizes, config)
    expected = reference.postprocess_loop(locs, logits, anchors, sizes, config)
    torch.testing.assert_close(det.anchor_indices, expected.anchor_indices, rtol=0, atol=0)


@needs_emulator
@pytest.mark.parametrize("activation", sorted(SSD_CONFIGS))
@pytest.mark.parametrize("per_image_anchors", [False, True])
def test_ssd_cuda_emulated(activation, per_image_anchors):
    config = SSD_CONFIGS[activation]
    inputs = make_inputs(2, 700, 7, seed=5, per_image_anchors=per_image_anchors)
    det = _emulated(*inputs, config)
    assert int(det.num_detections.min()) > 0
    assert bool((det.num_detections < det.scores.shape[1]).any())
    # The device's expf: scores and boxes within a few ULPs of torch's.
    assert_anchor_indices_consistent(det, *inputs, config, score_rtol=1e-5)
    # The same (label, anchor) rows as the CPU kernel, equal scores in the same order.
    assert_postprocess_match(
        run_postprocess(inputs, config, "cpu"),
        (det.boxes, det.scores, det.labels, det.num_detections, det.anchor_indices),
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_ssd_cpu_after_a_rescan(threads):
    """An image whose cut candidates keep too few survivors is scanned again (see
    test_bounded_scan.py): the rows written before the rescan are undone, anchor
    indices included, and the rows past the final count hold -1."""
    generator = torch.Generator().manual_seed(3)
    batch, num_anchors, classes = 2, 3000, 4
    logits = torch.randn(batch, num_anchors, classes, generator=generator)
    locs = torch.zeros(batch, num_anchors, 4)
    anchors = torch.tensor([[10.0, 10.0, 50.0, 60.0]]).expand(num_anchors, 4).contiguous()
    sizes = torch.tensor([[100, 100]] * batch)
    config = PostprocessConfig(
        score_thresh=0.01, nms_thresh=0.5, topk_candidates=3000, detections_per_img=10
    )
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.ops.ssd_post._debug_counters(True)
        det = ssd_post.postprocess(locs, logits, anchors, sizes, config)
        rescans = torch.ops.ssd_post._debug_counters(True)[1]
    finally:
        torch.set_num_threads(saved)
    assert rescans == batch
    assert det.num_detections.tolist() == [classes - 1] * batch
    assert_anchor_indices_consistent(det, locs, logits, anchors, sizes, config)
    expected = reference.postprocess_loop(locs, logits, anchors, sizes, config)
    torch.testing.assert_close(det.anchor_indices, expected.anchor_indices, rtol=0, atol=0)


def test_nothing_detected_is_all_padding():
    locs, logits, anchors, sizes = make_inputs(2, 300, 5, seed=1)
    config = PostprocessConfig(score_thresh=1.0)
    outputs = [ssd_post.postprocess(locs, logits, anchors, sizes, config)]
    if cuda_emulation.compiler() is not None:
        outputs.append(_emulated(locs, logits, anchors, sizes, config))
    for det in outputs:
        assert det.num_detections.tolist() == [0, 0]
        assert det.anchor_indices.shape == (2, config.padded_detections(300, 5))
        assert bool((det.anchor_indices == -1).all())
    empty = ssd_post.postprocess(*make_inputs(2, 0, 5), config)
    assert empty.anchor_indices.shape == (2, 0) and empty.anchor_indices.dtype == torch.int64


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(problems(exact_boxes=True))
def test_random_small_problems(problem):
    """Hypothesis: batch 0-3, up to 12 anchors, ties, NaN / inf logits, per-image
    anchors; the CPU kernel's anchor indices equal the oracle's, and both the CPU
    kernel and the emulated CUDA kernel pass the decode check."""
    locs, logits, anchors, image_sizes, config = problem
    sizes = torch.tensor(image_sizes, dtype=torch.int64).reshape(len(image_sizes), 2)
    det = ssd_post.postprocess(locs, logits, anchors, sizes, config)
    expected = reference.postprocess_loop(locs, logits, anchors, sizes, config)
    torch.testing.assert_close(det.anchor_indices, expected.anchor_indices, rtol=0, atol=0)
    assert_anchor_indices_consistent(det, locs, logits, anchors, sizes, config, box_atol=0.0)
    if cuda_emulation.compiler() is not None:
        emulated = _emulated(locs, logits, anchors, sizes, config)
        assert_anchor_indices_consistent(
            emulated, locs, logits, anchors, sizes, config, score_rtol=1e-5, box_atol=0.0
        )


# ----------------------------------------------------------------------------- Detections


def _small_detections() -> ssd_post.Detections:
    locs, logits, anchors, sizes = make_inputs(2, 200, 5, seed=4)
    return ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig())


def test_to_carries_anchor_indices_and_to_list_keeps_torchvision_keys():
    det = _small_detections()
    moved = det.to("cpu")
    assert torch.equal(moved.anchor_indices, det.anchor_indices)
    assert (
        ssd_post.Detections(det.boxes, det.scores, det.labels, det.num_detections)
        .to("cpu")
        .anchor_indices
        is None
    )
    assert all(set(d) == {"boxes", "scores", "labels"} for d in det.to_list())


def test_detections_from_exported_outputs():
    """An exported graph's outputs: the fifth (anchor_indices) made int64 as the
    counts and labels are (a runtime may give int32); a graph exported with four
    outputs gives None; any other count is refused."""
    from ssd_post.exportable import detections_from_outputs

    det = _small_detections()
    outputs = (det.boxes, det.scores, det.labels.int(), det.num_detections.int())
    full = detections_from_outputs(outputs + (det.anchor_indices.int(),))
    assert full.anchor_indices.dtype == torch.int64 and full.labels.dtype == torch.int64
    assert torch.equal(full.anchor_indices, det.anchor_indices)
    assert detections_from_outputs(outputs).anchor_indices is None
    with pytest.raises(ValueError, match="4 or 5 outputs, got 3"):
        detections_from_outputs(outputs[:3])
