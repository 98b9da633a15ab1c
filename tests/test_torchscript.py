"""What scripts with torch.jit.script and what does not (docs/torchscript.md).

batched_nms's own eager == scripted tests are in test_batched_nms.py.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import pytest
import torch
from torch import Tensor

import ssd_post
from ssd_post import PostprocessConfig

from common_utils import random_boxes


def _script(fn):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        return torch.jit.script(fn)


def ssd_postprocess_op(
    locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The recipe of docs/torchscript.md: the op itself, with torchvision SSD's
    # settings spelled out (PostprocessConfig() in eager).
    return torch.ops.ssd_post.postprocess(
        locs, logits, anchors, image_sizes, 0.01, 0.45, 400, 200, [10.0, 10.0, 5.0, 5.0],
        "softmax", 0, True,
    )  # fmt: skip


def test_a_scripted_function_calling_the_op_equals_postprocess():
    generator = torch.Generator().manual_seed(0)
    locs = torch.randn(2, 300, 4, generator=generator)
    logits = torch.randn(2, 300, 6, generator=generator) * 3
    anchors = random_boxes(300, generator, size=300.0)
    sizes = torch.tensor([[300, 300], [240, 280]])
    scripted = _script(ssd_postprocess_op)
    expected = ssd_post.postprocess(locs, logits, anchors, sizes, PostprocessConfig())
    got = scripted(locs, logits, anchors, sizes)
    assert int(expected.num_detections.sum()) > 0
    want = (
        expected.boxes,
        expected.scores,
        expected.labels,
        expected.num_detections,
        expected.anchor_indices,
    )
    assert len(got) == len(want)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fn", [ssd_post.postprocess, ssd_post.decode_threshold_flatten, ssd_post.patch_torchvision]
)
def test_the_python_entry_points_do_not_script(fn):
    # docs/torchscript.md says why; if one starts to script, update the page.
    with pytest.raises(Exception):
        _script(fn)


@pytest.mark.slow
def test_scripting_a_patched_torchvision_ssd_runs_torchvision_postprocess():
    from torchvision.models.detection import ssd300_vgg16

    torch.manual_seed(0)
    model = ssd_post.patch_torchvision(ssd300_vgg16(weights=None, weights_backbone=None).eval())
    scripted = _script(model)
    # TorchScript compiles the class's postprocess_detections, not the method that
    # patch_torchvision set on the instance: the scripted model is torchvision's.
    assert "ssd_post" not in scripted.postprocess_detections.code
    images = [torch.rand(3, 300, 300)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "SSD always returns", UserWarning)
        eager = model(images)
        _, script_out = scripted(images)  # scripted detection models return (losses, dets)
    # Same detections either way (ssd_post equals torchvision to the bit up to ties).
    assert len(eager[0]["scores"]) > 0
    torch.testing.assert_close(script_out[0]["scores"], eager[0]["scores"], rtol=0, atol=0)
