"""The ops are proper torch ops: opcheck-clean and usable under torch.compile."""

from __future__ import annotations

import pytest
import torch

import ssd_post
from ssd_post import PostprocessConfig


def _inputs(batch=2, anchors_n=64, classes=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    locs = torch.randn(batch, anchors_n, 4, generator=generator)
    logits = torch.randn(batch, anchors_n, classes, generator=generator) * 2
    xy = torch.rand(anchors_n, 2, generator=generator) * 50
    anchors = torch.cat((xy, xy + 5 + torch.rand(anchors_n, 2, generator=generator) * 20), dim=1)
    sizes = torch.tensor([[64, 64], [48, 80]])[:batch]
    return locs, logits, anchors, sizes


OPS = ("postprocess", "decode_threshold_flatten", "batched_nms")
COMMON = dict(
    box_weights=[10.0, 10.0, 5.0, 5.0],
    score_activation="softmax",
    background_class=0,
    clip_boxes=True,
)


def test_opcheck_postprocess():
    locs, logits, anchors, sizes = _inputs()
    torch.library.opcheck(
        torch.ops.ssd_post.postprocess.default,
        (locs, logits, anchors, sizes, 0.1, 0.5, 20, 10),
        COMMON,
    )


def test_opcheck_decode_threshold_flatten():
    locs, logits, anchors, sizes = _inputs()
    torch.library.opcheck(
        torch.ops.ssd_post.decode_threshold_flatten.default,
        (locs, logits, anchors, sizes, 0.1, 20),
        COMMON,
    )


@pytest.mark.parametrize("limits", [(), (4,), (4, 2), (None, None)])
def test_opcheck_batched_nms(limits):
    # (): the four-argument call of older callers and exported graphs; then max_kept
    # per group, max_kept per image (keys_per_image = 2), both left at None.
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=generator) * 50
    boxes = torch.cat((xy, xy + 10), dim=1)
    torch.library.opcheck(
        torch.ops.ssd_post.batched_nms.default,
        (
            boxes,
            torch.rand(50, generator=generator),
            torch.randint(0, 3, (50,), generator=generator),
            0.5,
            *limits,
        ),
    )


def test_schemas_are_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ssd_post::{op}", "CPU")


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


def test_has_cuda_kernels_agrees_with_the_dispatcher_for_every_op():
    """True exactly when all three ops have a CUDA kernel (a build registers all or none)."""
    per_op = {
        op: torch._C._dispatch_has_kernel_for_dispatch_key(f"ssd_post::{op}", "CUDA") for op in OPS
    }
    assert len(set(per_op.values())) == 1, per_op
    assert ssd_post.has_cuda_kernels() is per_op["postprocess"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_has_cuda_kernels_means_the_op_runs_on_cuda():
    if not ssd_post.has_cuda_kernels():
        pytest.skip("extension built without CUDA kernels")
    locs, logits, anchors, sizes = (t.cuda() for t in _inputs())
    det = ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig(score_thresh=0.1))
    assert det.boxes.device.type == "cuda"
