"""Box overlap for the data pipeline, in numpy.

The shapes generator and the albumentations crop work on numpy arrays inside the
loader workers, one box against a handful at a time; torchvision.ops.box_iou (which
the models use) would add a tensor round trip per sample for nothing, so this one
numpy helper serves both.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """Areas (n,) of xyxy boxes (n, 4)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_overlaps(box: np.ndarray, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Intersection areas (n,) and IoU (n,) of one xyxy box (4,) with boxes (n, 4)."""
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter, inter / np.maximum(area + box_areas(boxes) - inter, 1e-12)
