"""RetinaNet-ResNet50-FPN with torchvision's state_dict layout, postprocessed by ssd_post.

The backbone (ResNet-50 + FPN with P6/P7) and the head are torchvision's own, built
without weights (nothing is downloaded), so a torchvision ``retinanet_resnet50_fpn``
state_dict loads with ``strict=True``. The anchors are torchvision's
``AnchorGenerator`` on the network input, the loss is torchvision's
(``RetinaNet.compute_loss``: focal loss + L1 box loss, IoU matcher with low-quality
matches), and inference goes through ssd_post's per-level postprocess.

Unlike torchvision, which resizes each image to a shorter side of 800 (longer side at
most 1333) and pads the batch, the data pipeline here feeds one fixed ``image_size``
(default 800x800; both sides multiples of 32, the size torchvision pads a batch to,
so anchors and feature grids are those torchvision gives an image of that size).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.models import detection
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNet

from ssd_post import PostprocessConfig

from .detector import SingleStageDetector

ARCH = "retinanet_resnet50_fpn"
DEFAULT_SIZE = (800, 800)
# torchvision's GeneralizedRCNNTransform pads batches to multiples of 32 (size_divisible).
SIZE_MULTIPLE = 32
MIN_SIDE = 64


class GridAnchors:
    """torchvision's ``AnchorGenerator`` as a function of the input size and the
    feature-map sizes, the interface of :class:`ssd_post.DefaultBoxes`.

    Args:
        generator: the model's anchor generator (sizes and aspect ratios per level).
    """

    def __init__(self, generator: AnchorGenerator) -> None:
        self.generator = generator

    def __call__(
        self, image_size: Tuple[int, int], grid_sizes: Sequence[Tuple[int, int]]
    ) -> Tensor:
        """xyxy anchors (Tensor[A, 4] float32) in input pixels, level by level."""
        images = ImageList(torch.zeros(1, 1, *image_size), [tuple(image_size)])
        features = [torch.zeros(1, 1, h, w) for h, w in grid_sizes]
        return self.generator(images, features)[0]

    def level_sizes(self, grid_sizes: Sequence[Tuple[int, int]]) -> List[int]:
        """Anchors per feature level (what ssd_post's per-level selection needs)."""
        per_location = self.generator.num_anchors_per_location()
        return [h * w * n for (h, w), n in zip(grid_sizes, per_location)]


class RetinaNetDetector(SingleStageDetector):
    """RetinaNet on :class:`SingleStageDetector`'s interface: ``forward`` gives
    ``(locs[B, A, 4], logits[B, A, C])`` over all levels, ``predict`` runs the per-level
    postprocess, ``compute_loss`` is torchvision's RetinaNet loss."""

    def compute_loss(
        self, images: Tensor, targets: Sequence[Mapping[str, Tensor]], options: Mapping[str, Any]
    ) -> Dict[str, Tensor]:
        """torchvision's RetinaNet loss of a batch.

        Args:
            images (Tensor[B, 3, H, W]): the network input.
            targets: per image ``boxes`` (Tensor[n, 4] xyxy input pixels) and ``labels``.
            options: ``iou_thresh`` (foreground IoU, 0.5 in torchvision) and
                ``bg_iou_thresh`` (background below it, 0.4).

        Returns:
            ``{"bbox": L1 box term, "cls": focal term, "loss": their sum}``.
        """
        locs, logits = self(images)
        anchors = self.anchors().to(locs.device)
        matcher = det_utils.Matcher(
            float(options["iou_thresh"]),
            float(options["bg_iou_thresh"]),
            allow_low_quality_matches=True,
        )
        # RetinaNet.compute_loss needs only these two attributes of the model.
        owner = SimpleNamespace(proposal_matcher=matcher, head=self.head)
        device_targets = [
            {
                "boxes": t["boxes"].to(locs.device, torch.float32),
                "labels": t["labels"].to(locs.device),
            }
            for t in targets
        ]
        losses = RetinaNet.compute_loss(
            owner,
            device_targets,
            {"cls_logits": logits, "bbox_regression": locs},
            [anchors] * locs.shape[0],
        )
        cls, bbox = losses["classification"], losses["bbox_regression"]
        return {"bbox": bbox, "cls": cls, "loss": bbox + cls}


def check_image_size(image_size: Any) -> None:
    """RetinaNet's input (h, w): both multiples of 32, at least 64."""
    if not all(v >= MIN_SIDE and v % SIZE_MULTIPLE == 0 for v in image_size):
        raise ValueError(
            f"{ARCH} needs image_size (h, w) with both sides multiples of {SIZE_MULTIPLE} "
            f"and >= {MIN_SIDE}, got {tuple(image_size)}"
        )


def build_retinanet_resnet50_fpn(num_classes: int):
    """Parts of torchvision's ``retinanet_resnet50_fpn`` (random weights): backbone,
    head, postprocess config, image mean and std, anchors."""
    model = detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return (
        model.backbone,
        model.head,
        PostprocessConfig.from_torchvision(model),
        tuple(model.transform.image_mean),
        tuple(model.transform.image_std),
        GridAnchors(model.anchor_generator),
    )
