"""ssd_post::decode_boxes: the box coder's decode as one op, bit-equal to
ssd_post.box_coder.BoxCoder.decode (itself torchvision's decode_single, held equal
to torchvision by the parity tests) for every weight, dtype and edge."""

from __future__ import annotations

import pytest
import torch

from ssd_post import ops
from ssd_post.box_coder import BOX_SCALE_CLAMP, BoxCoder

from common_utils import cpu_and_cuda


def _case(seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    rel = torch.randn(3, 400, 4, generator=generator) * 3
    rel[0, 0, 2] = 100.0  # past the clamp: exp(log(1000 / 16))
    rel[0, 1, 3] = BOX_SCALE_CLAMP * 5  # at the clamp after / wh
    rel[1, 2, 0] = float("nan")
    rel[2, 3, 1] = float("inf")
    xy = torch.rand(400, 2, generator=generator) * 300 - 50
    anchors = torch.cat((xy, xy + torch.rand(400, 2, generator=generator) * 80), dim=1)
    return rel.to(dtype), anchors


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize(
    "weights", [(10.0, 10.0, 5.0, 5.0), (1.0, 1.0, 1.0, 1.0), (3.0, 7.0, 0.5, 2.0)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_equals_the_box_coder(device, weights, dtype):
    rel, anchors = _case(int(weights[3] * 10), dtype)
    got = ops.decode_boxes(rel.to(device), anchors.to(device), weights)
    want = BoxCoder(weights).decode(rel.to(device), anchors.to(device))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_anchors_broadcast_per_image():
    rel, anchors = _case(1)
    per_image = anchors.expand(3, -1, -1)
    torch.testing.assert_close(
        ops.decode_boxes(rel, per_image, (10, 10, 5, 5)),
        ops.decode_boxes(rel, anchors, (10, 10, 5, 5)),
        rtol=0,
        atol=0,
        equal_nan=True,
    )


@pytest.mark.parametrize(
    "rel, anchors, weights, match",
    [
        (torch.zeros(2, 3), torch.zeros(2, 4), (1, 1, 1, 1), r"rel_codes should be \[\.\.\., 4\]"),
        (
            torch.zeros(2, 4),
            torch.zeros(2, 4, dtype=torch.int64),
            (1, 1, 1, 1),
            "anchors should be floating",
        ),
        (torch.zeros(2, 4), torch.zeros(2, 4), (1, 1, 1), "weights should be 4 floats"),
        (torch.zeros(2, 4), torch.zeros(2, 4), (1, 1, 0, 1), "weights should be finite and > 0"),
    ],
)
def test_bad_input_is_named(rel, anchors, weights, match):
    with pytest.raises(ValueError, match=match):
        ops.decode_boxes(rel, anchors, weights)
