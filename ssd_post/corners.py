"""Boxes whose corners are not x1 <= x2, y1 <= y2 ("inverted" boxes).

ssd_post, like torchvision, takes boxes as given: an inverted box has zero area
(its IoU with anything is 0), so it suppresses nothing and is never suppressed.
ONNX and TensorFlow NMS sort the corners first; a model ported from them can ask
for that, or for an error, with ``inverted_boxes``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import INVERTED_BOXES


def handle_inverted_boxes(boxes: Tensor, mode: str, name: str) -> Tensor:
    """Applies ``mode`` to ``boxes`` (Tensor[..., 4], xyxy).

    ``"keep"`` returns ``boxes``; ``"sort"`` returns them with x1 <= x2 and
    y1 <= y2 (NaN stays NaN); ``"raise"`` raises a ValueError naming ``name`` and
    the first inverted box, and returns ``boxes`` otherwise (this reads the values:
    a device synchronization on CUDA).
    """
    if mode not in INVERTED_BOXES:
        raise ValueError(f"inverted_boxes should be one of {INVERTED_BOXES}, got {mode!r}")
    if mode == "keep" or boxes.numel() == 0:
        return boxes
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} should be a tensor [..., 4] of xyxy boxes, got shape {tuple(boxes.shape)}"
        )
    x1, y1, x2, y2 = boxes.unbind(-1)
    if mode == "sort":
        return torch.stack(
            (
                torch.minimum(x1, x2),
                torch.minimum(y1, y2),
                torch.maximum(x1, x2),
                torch.maximum(y1, y2),
            ),
            dim=-1,
        )
    inverted = (x2 < x1) | (y2 < y1)
    if bool(inverted.any()):
        index = tuple(int(i) for i in inverted.nonzero()[0])
        raise ValueError(
            f"{name} should have x1 <= x2 and y1 <= y2 (inverted_boxes='raise'), "
            f"got {boxes[index].tolist()} at index {index if len(index) > 1 else index[0]}"
        )
    return boxes
