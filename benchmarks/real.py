"""The *real* scenario: head outputs of the trained tiny model on the shapes data.

Needs ``checkpoints/tiny_shapes.pt``; without it (or without the data set code) the
scenario is skipped with the reason, so the synthetic scenarios still run.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .scenarios import Inputs

CHECKPOINT = os.path.join("checkpoints", "tiny_shapes.pt")
DATA_ROOT = os.path.join("data", "shapes")


def unavailable_reason(checkpoint: str = CHECKPOINT) -> Optional[str]:
    """Why the real scenario cannot run, or None when it can."""
    if not os.path.isfile(checkpoint):
        return f"{checkpoint} not found (train the tiny model first)"
    try:
        import models.checkpoint  # noqa: F401
        import training.data.coco  # noqa: F401
        import training.data.shapes  # noqa: F401
        import training.data.transforms  # noqa: F401
    except ImportError as err:
        return f"model or data code missing: {err}"
    return None


@torch.no_grad()
def make_real_inputs(batch: int, checkpoint: str = CHECKPOINT) -> Inputs:
    """The model's (locs, logits) on the first ``batch`` validation images.

    Batches larger than the validation split reuse its images in order.
    """
    from models.checkpoint import load_detector
    from training.data.coco import CocoDetectionDataset
    from training.data.shapes import ensure_shapes_dataset
    from training.data.transforms import eval_transforms

    model = load_detector(checkpoint).eval()
    image_dir, ann_file = ensure_shapes_dataset(DATA_ROOT)["val"]
    dataset = CocoDetectionDataset(image_dir, ann_file, eval_transforms(model.image_size))
    images = torch.stack([dataset[i % len(dataset)][0] for i in range(batch)])
    locs, logits = [], []
    for chunk in images.split(16):
        chunk_locs, chunk_logits = model(chunk)
        locs.append(chunk_locs)
        logits.append(chunk_logits)
    height, width = _hw(model.image_size)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    return Inputs(torch.cat(locs).float().contiguous(), torch.cat(logits).float().contiguous(),
                  model.anchors().float(), sizes, model.postprocess_config)


def _hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])
