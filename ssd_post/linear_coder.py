"""FCOS box coding: distances from the anchor centre to the four box sides."""

from __future__ import annotations

import torch
from torch import Tensor

from .box_coder import _check_last_dim


class LinearBoxCoder:
    """Decodes (left, top, right, bottom) distances, in units of the anchor size, into
    xyxy boxes: torchvision's ``BoxLinearCoder(normalize_by_size=True)`` in its op
    order, so the bits are the same. Arithmetic in float32 whatever the input dtype.
    """

    def decode(self, rel_codes: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from regressions.

        Args:
            rel_codes (Tensor[..., 4]): (left, top, right, bottom) / anchor (w, h, w, h).
            anchors (Tensor[..., 4]): xyxy anchors, broadcastable to ``rel_codes``.

        Returns:
            Tensor[..., 4] float32: xyxy boxes (not clipped).
        """
        _check_last_dim(rel_codes, "rel_codes")
        _check_last_dim(anchors, "anchors")
        rel_codes, anchors = rel_codes.float(), anchors.float()
        ctr_x = 0.5 * (anchors[..., 0] + anchors[..., 2])
        ctr_y = 0.5 * (anchors[..., 1] + anchors[..., 3])
        widths = anchors[..., 2] - anchors[..., 0]
        heights = anchors[..., 3] - anchors[..., 1]
        rel_codes = rel_codes * torch.stack((widths, heights, widths, heights), dim=-1)
        return torch.stack(
            (
                ctr_x - rel_codes[..., 0],
                ctr_y - rel_codes[..., 1],
                ctr_x + rel_codes[..., 2],
                ctr_y + rel_codes[..., 3],
            ),
            dim=-1,
        )
