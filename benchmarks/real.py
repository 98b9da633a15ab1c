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


def model_input_images(model, image_dir: str, ann_file: str, batch: int) -> torch.Tensor:
    """The first ``batch`` images of a COCO-format set as ``model`` takes them
    (Tensor[batch, 3, H, W]): resized to its input size and normalised with its own
    mean and std. Batches larger than the set reuse its images in order."""
    from training.data.coco import CocoDetectionDataset
    from training.data.transforms import eval_transforms

    transform = eval_transforms(model.image_size, model.image_mean, model.image_std)
    dataset = CocoDetectionDataset(image_dir, ann_file, transform, verbose=False)
    return torch.stack([dataset[i % len(dataset)][0] for i in range(batch)])


@torch.no_grad()
def make_real_inputs(batch: int, checkpoint: str = CHECKPOINT) -> Inputs:
    """The model's (locs, logits) on the first ``batch`` validation images."""
    from models.checkpoint import load_detector
    from training.data.shapes import ensure_shapes_dataset

    model = load_detector(checkpoint).eval()
    images = model_input_images(model, *ensure_shapes_dataset(DATA_ROOT)["val"], batch)
    locs, logits = [], []
    for chunk in images.split(16):
        chunk_locs, chunk_logits = model(chunk)
        locs.append(chunk_locs)
        logits.append(chunk_logits)
    height, width = _hw(model.image_size)
    sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
    return Inputs(
        torch.cat(locs).float().contiguous(),
        torch.cat(logits).float().contiguous(),
        model.anchors().float(),
        sizes,
        model.postprocess_config,
    )


def _hw(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    return int(image_size[0]), int(image_size[1])
