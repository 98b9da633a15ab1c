"""SSD box coding: regression targets relative to anchors, and back."""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

# Largest dw/dh accepted before exp: a box may grow at most 1000/16 times its
# anchor, so an untrained head cannot overflow float32.
BOX_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes xyxy boxes against xyxy anchors as (dx, dy, dw, dh) and decodes them.

    ``decode(encode(boxes, anchors), anchors) == boxes`` (up to float rounding, for
    boxes whose log size ratio stays under ``BOX_SCALE_CLAMP``). Both directions run
    in float32 whatever the input dtype, in torchvision's op order, so decoding gives
    the same bits as ``torchvision.models.detection._utils.BoxCoder.decode_single``.

    Args:
        weights: (wx, wy, ww, wh); SSD's variances (0.1, 0.2) are (10, 10, 5, 5).
    """

    def __init__(self, weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)) -> None:
        if len(weights) != 4 or not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"weights should be 4 finite positive floats, got {tuple(weights)}")
        self.weights: Tuple[float, float, float, float] = tuple(float(w) for w in weights)

    @staticmethod
    def _centers(boxes: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        widths = boxes[..., 2] - boxes[..., 0]
        heights = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets.

        Args:
            boxes (Tensor[..., 4]): xyxy ground-truth boxes with positive size.
            anchors (Tensor[..., 4]): xyxy anchors, broadcastable to ``boxes``.

        Returns:
            Tensor[..., 4] float32: (dx, dy, dw, dh) scaled by the weights.
        """
        _check_last_dim(boxes, "boxes")
        _check_last_dim(anchors, "anchors")
        boxes, anchors = boxes.float(), anchors.float()
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centers(anchors)
        gx, gy, gw, gh = self._centers(boxes)
        return torch.stack(
            (
                wx * (gx - ax) / aw,
                wy * (gy - ay) / ah,
                ww * torch.log(gw / aw),
                wh * torch.log(gh / ah),
            ),
            dim=-1,
        )

    def decode(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from regressions.

        Args:
            rel_codes (Tensor[..., 4]): (dx, dy, dw, dh), any float dtype.
            anchors (Tensor[..., 4]): xyxy anchors, broadcastable to ``rel_codes``.

        Returns:
            Tensor[..., 4] float32: xyxy boxes (not clipped).
        """
        _check_last_dim(rel_codes, "rel_codes")
        _check_last_dim(anchors, "anchors")
        rel_codes, anchors = rel_codes.float(), anchors.float()
        wx, wy, ww, wh = self.weights
        ctr_x, ctr_y, widths, heights = self._centers(anchors)
        dx = rel_codes[..., 0] / wx
        dy = rel_codes[..., 1] / wy
        dw = torch.clamp(rel_codes[..., 2] / ww, max=BOX_SCALE_CLAMP)
        dh = torch.clamp(rel_codes[..., 3] / wh, max=BOX_SCALE_CLAMP)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        return torch.stack(
            (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h),
            dim=-1,
        )


def _check_last_dim(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} should be a Tensor, got {type(t).__name__}")
    if t.dim() < 1 or t.shape[-1] != 4:
        raise ValueError(f"{name} should have shape [..., 4], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} should be a floating point tensor, got {t.dtype}")


def clip_boxes(boxes: Tensor, image_size: Tuple[Union[int, Tensor], Union[int, Tensor]]) -> Tensor:
    """Clip xyxy boxes (Tensor[..., 4]) to an image of size (height, width).

    height and width are ints, or Tensors of shape [..., 1] (one size per box)."""
    height, width = image_size
    # Two clamps rather than one: clamp takes a Tensor max only without a Number min.
    # min(max(x, 0), w) either way, the same bits as torchvision's clamp(min=0, max=w).
    x = boxes[..., 0::2].clamp(min=0).clamp(max=width)
    y = boxes[..., 1::2].clamp(min=0).clamp(max=height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)
