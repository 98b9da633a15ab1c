"""The ops are proper torch ops: opcheck-clean and usable under torch.compile."""

from __future__ import annotations

import pytest
import torch

import ssd_post
from common_utils import cpu_and_cuda, needs_cuda
from ssd_post import PostprocessConfig


def _inputs(batch=2, anchors_n=64, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    locs = torch.randn(batch, anchors_n, 4, generator=generator)
    logits = torch.randn(batch, anchors_n, classes, generator=generator) * 2
    xy = torch.rand(anchors_n, 2, generator=generator) * 50
    anchors = torch.cat((xy, xy + 5 + torch.rand(anchors_n, 2, generator=generator) * 20), dim=1)
    sizes = torch.tensor([[64, 64], [48, 80]])[:batch]
    return locs, logits, anchors, sizes


# The devices with a kernel of each op;
# test_kernels_are_registered_where_listed keeps this table true.
KERNEL_DEVICES = {
    "postprocess": ("cpu", "cuda"),
    "decode_threshold_flatten": ("cpu", "cuda"),
    "batched_nms": ("cpu", "cuda"),
    "select_topk": ("cpu", "cuda"),
    "batched_nms_padded": ("cpu", "cuda"),
    "best_class": ("cpu", "cuda"),
    "best_class_candidates": ("cpu", "cuda"),
    "_best_class_candidates_composite": ("cpu", "cuda"),
    "decode_boxes": ("cpu", "cuda"),
}
# Ops whose every device but the CPU runs one composition of other ops
# (csrc/composite/): registered for CompositeExplicitAutograd, not per device.
COMPOSITE = {
    "best_class_candidates": "CPU",
    "_best_class_candidates_composite": None,
    "decode_boxes": None,
}
OPS = tuple(KERNEL_DEVICES)
COMMON = dict(
    box_weights=[10.0, 10.0, 5.0, 5.0],
    score_activation="softmax",
    background_class=0,
    clip_boxes=True,
)


def _opcheck_args(op: str, device: str):
    """(args, kwargs) of one call of ``torch.ops.ssd_post.<op>`` on ``device``."""
    locs, logits, anchors, sizes = (t.to(device) for t in _inputs())
    if op == "postprocess":
        return (locs, logits, anchors, sizes, 0.1, 0.5, 20, 10), COMMON
    if op == "decode_threshold_flatten":
        return (locs, logits, anchors, sizes, 0.1, 20), COMMON
    if op == "select_topk":
        centerness = torch.randn(logits.shape[:2], generator=torch.Generator().manual_seed(2))
        # logits, centerness, level_sizes, score_thresh, topk_candidates, background_class
        return (logits, centerness.to(device), [40, 24], 0.3, 12, None), {}
    if op == "batched_nms_padded":
        generator = torch.Generator().manual_seed(3)
        xy = torch.rand(2, 30, 2, generator=generator) * 50
        boxes = torch.cat((xy, xy + 10), dim=2)
        scores = torch.rand(2, 30, generator=generator)
        labels = torch.randint(-1, 3, (2, 30), generator=generator)  # -1: empty slots
        # boxes, scores, labels, iou_threshold, max_kept (below M), class_agnostic
        return tuple(t.to(device) for t in (boxes, scores, labels)) + (0.5, 7), {
            "class_agnostic": True
        }
    if op == "best_class":
        # YOLOv8's class-score slice [B, nc, N] of a [B, 4 + nc, N] output (a view).
        prediction = torch.rand(2, 4 + 7, 37, generator=torch.Generator().manual_seed(4))
        return (prediction.to(device)[:, 4:],), {}
    if op == "decode_boxes":
        generator = torch.Generator().manual_seed(5)
        rel = torch.randn(2, 30, 4, generator=generator)
        xy = torch.rand(30, 2, generator=generator) * 50
        anchors = torch.cat((xy, xy + 10), dim=1)
        return (rel.to(device), anchors.to(device), [10.0, 10.0, 5.0, 5.0]), {}
    if op in ("best_class_candidates", "_best_class_candidates_composite"):
        prediction = torch.rand(2, 4 + 7, 37, generator=torch.Generator().manual_seed(4))
        # scores, score_thresh, max_candidates (binding for one image), classes, boxes
        prediction = prediction.to(device)
        return (prediction[:, 4:], 0.6, 9), {
            "classes": [0, 2, 3, 6],
            "boxes": prediction[:, :4],
            "box_format": "cxcywh",
        }
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=generator) * 50
    boxes = torch.cat((xy, xy + 10), dim=1)
    scores = torch.rand(50, generator=generator)
    idxs = torch.randint(0, 3, (50,), generator=generator)
    return tuple(t.to(device) for t in (boxes, scores, idxs)) + (0.5,), {}


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("limits", [(4,), (4, 2), (None, None)])
def test_opcheck_batched_nms_limits(limits, device):
    # max_kept per group, max_kept per image (keys_per_image = 2), both left at None;
    # test_opcheck covers the four-argument call of older callers and exported graphs.
    if device == "cuda" and not ssd_post.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    args, kwargs = _opcheck_args("batched_nms", device)
    torch.library.opcheck(torch.ops.ssd_post.batched_nms.default, args + limits, kwargs)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, device):
    if device not in KERNEL_DEVICES[op]:
        pytest.skip(f"{op} has no {device} kernel")
    if device == "cuda" and not ssd_post.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    args, kwargs = _opcheck_args(op, device)
    torch.library.opcheck(getattr(torch.ops.ssd_post, op).default, args, kwargs)


@pytest.mark.parametrize("op", OPS)
def test_kernels_are_registered_where_listed(op):
    """CPU kernels always; CUDA kernels exactly when the build has them (a build
    registers them for every op of KERNEL_DEVICES or for none)."""

    def has(key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"ssd_post::{op}", key)

    if op in COMPOSITE:
        assert has("CompositeExplicitAutograd")
        assert has("CPU") is (COMPOSITE[op] == "CPU")
        assert not has("CUDA")
        return
    assert has("CPU") is ("cpu" in KERNEL_DEVICES[op])
    assert has("CUDA") is (ssd_post.has_cuda_kernels() and "cuda" in KERNEL_DEVICES[op])


def test_postprocess_inside_torch_compile_fullgraph():
    locs, logits, anchors, sizes = _inputs()
    config = PostprocessConfig(score_thresh=0.1, detections_per_img=10)

    def run(locs, logits):
        det = ssd_post.postprocess(locs, logits, anchors, sizes, config)
        return det.boxes, det.scores, det.labels, det.num_detections

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(locs, logits), run(locs, logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_data_dependent_ops_inside_torch_compile():
    locs, logits, anchors, sizes = _inputs()
    config = PostprocessConfig(score_thresh=0.1)

    def run(locs, logits):
        boxes, scores, keys = ssd_post.decode_threshold_flatten(
            locs, logits, anchors, sizes, config
        )
        keep = ssd_post.batched_nms(boxes, scores, keys, 0.5)
        return boxes[keep], scores[keep], keys[keep]

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
        result = compiled(locs, logits)
    for got, want in zip(result, run(locs, logits)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(result[0]) > 0


@needs_cuda
def test_has_cuda_kernels_means_the_op_runs_on_cuda():
    if not ssd_post.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    locs, logits, anchors, sizes = (t.cuda() for t in _inputs())
    det = ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig(score_thresh=0.1))
    assert det.boxes.device.type == "cuda"
