"""Boxes whose corners are not x1 <= x2, y1 <= y2 ("inverted" boxes).

ssd_post, like torchvision, takes boxes as given: an inverted box has zero area
(its IoU with anything is 0), so it suppresses nothing and is never suppressed.
ONNX and TensorFlow NMS sort the corners first; a model ported from them can ask
for that, or for an error, with ``inverted_boxes``.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .config import inverted_boxes_modes


def handle_inverted_boxes(boxes: Tensor, mode: str, name: str) -> Tensor:
    """Applies ``mode`` to ``boxes`` (Tensor[..., 4], xyxy).

    ``"keep"`` returns ``boxes``; ``"sort"`` returns them with x1 <= x2 and
    y1 <= y2 (NaN stays NaN); ``"raise"`` raises a ValueError naming ``name`` and
    the first inverted box, and returns ``boxes`` otherwise (this reads the values:
    a device synchronization on CUDA).
    """
    # Written for TorchScript too (batched_nms scripts): no generator expressions,
    # no !r conversions, typed lists.
    modes = inverted_boxes_modes()
    if mode not in modes:
        raise ValueError(f"inverted_boxes should be one of {modes}, got '{mode}'")
    if mode == "keep" or boxes.numel() == 0:
        return boxes
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ValueError(
            f"{name} should be a tensor [..., 4] of xyxy boxes, got shape {list(boxes.shape)}"
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
        position: List[int] = inverted.nonzero()[0].tolist()
        box: List[float] = boxes.reshape(-1, 4)[int(inverted.reshape(-1).nonzero()[0])].tolist()
        index = (
            str(position[0])
            if len(position) == 1
            else "(" + ", ".join([str(i) for i in position]) + ")"
        )
        raise ValueError(
            f"{name} should have x1 <= x2 and y1 <= y2 (inverted_boxes='raise'), "
            f"got {box} at index {index}"
        )
    return boxes
