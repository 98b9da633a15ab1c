"""albumentations pipelines for SSD: the paper's training augmentation and plain eval.

Training (SSD paper, section 2.2 / torchvision's references/detection):
photometric distortion -> zoom out (expand onto a mean-coloured canvas) ->
IoU-constrained random crop -> horizontal flip -> resize -> normalize.
Boxes ride along in ``pascal_voc`` (xyxy pixels) with a ``labels`` field; a box
keeping less than ``min_visibility`` of its area after the crop is dropped.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import albumentations as A
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.pytorch import ToTensorV2

from ..config import AugmentConfig
from .boxes import box_overlaps

ImageSize = Tuple[int, int]
Mean = Tuple[float, float, float]


class IoURandomCrop(BaseCrop):
    """SSD's random crop: a patch whose IoU with some object is at least a random bound.

    The bound is drawn from ``min_ious`` (None: keep the whole image); the patch has
    sides in [``min_scale``, 1] of the image and aspect ratio in [1/2, 2]; a patch
    is accepted when at least one object's centre lies in it and its IoU with the
    objects reaches the bound, else the image is kept whole after ``trials`` tries.
    """

    def __init__(
        self,
        min_ious: Sequence[Optional[float]] = (None, 0.1, 0.3, 0.5, 0.7, 0.9),
        min_scale: float = 0.3,
        trials: int = 40,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale should be in (0, 1], got {min_scale}")
        self.min_ious = list(min_ious)
        self.min_scale = min_scale
        self.trials = trials

    def get_params_dependent_on_data(
        self, params: Dict[str, Any], data: Dict[str, Any]
    ) -> Dict[str, Any]:
        height, width = params["shape"][:2]
        whole = {"crop_coords": (0, 0, width, height)}
        boxes = np.asarray(data.get("bboxes", np.zeros((0, 4))), dtype=np.float64)[:, :4]
        min_iou = self.py_random.choice(self.min_ious)
        if min_iou is None or len(boxes) == 0:
            return whole
        boxes = boxes * np.array(
            [width, height, width, height]
        )  # albumentations keeps them normalised
        centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
        for _ in range(self.trials):
            w = self.py_random.uniform(self.min_scale, 1.0) * width
            h = self.py_random.uniform(self.min_scale, 1.0) * height
            if not 0.5 <= w / h <= 2.0:
                continue
            x0 = self.py_random.uniform(0, width - w)
            y0 = self.py_random.uniform(0, height - h)
            crop = np.array([x0, y0, x0 + w, y0 + h])
            inside = ((centres > crop[:2]) & (centres < crop[2:])).all(axis=1)
            if not inside.any():
                continue
            if box_overlaps(crop, boxes)[1].max() < min_iou:
                continue
            coords = (int(x0), int(y0), int(math.ceil(x0 + w)), int(math.ceil(y0 + h)))
            return {
                "crop_coords": (coords[0], coords[1], min(coords[2], width), min(coords[3], height))
            }
        return whole

    def get_transform_init_args_names(self) -> Tuple[str, ...]:
        return ("min_ious", "min_scale", "trials")


def _bbox_params(min_visibility: float) -> A.BboxParams:
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        min_visibility=min_visibility,
        clip=True,
        filter_invalid_bboxes=True,
    )


def train_transforms(
    image_size: ImageSize, mean: Mean, std: Mean, augment: Optional[AugmentConfig] = None
) -> A.Compose:
    """SSD training augmentation ending in a normalised float tensor [3, H, W].

    Args:
        image_size: (height, width) of the network input.
        mean, std: per-channel normalisation of [0, 1] pixels: the model's own
            (``detector.image_mean``, ``detector.image_std``); no default, so a
            pipeline never silently normalises for another model.
        augment: probabilities and strengths (defaults: :class:`AugmentConfig`).
            ``expand_p`` zooms out onto a canvas up to ``max_expand`` times the image
            side, filled with the mean colour; boxes keeping less than
            ``min_visibility`` of their area are dropped.
    """
    augment = augment or AugmentConfig()
    photometric_p, expand_p, max_expand = (
        augment.photometric_p,
        augment.expand_p,
        augment.max_expand,
    )
    crop_p, flip_p, min_visibility = augment.crop_p, augment.flip_p, augment.min_visibility
    height, width = int(image_size[0]), int(image_size[1])
    fill = tuple(int(round(255 * m)) for m in mean)
    # CropAndPad pads each side by a random fraction: an expand with random placement.
    pad = (max_expand - 1.0) / 2.0
    return A.Compose(
        [
            A.OneOf(
                [
                    A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.05, p=1.0),
                    A.Compose(
                        [
                            A.RandomBrightnessContrast(0.2, 0.2, p=1.0),
                            A.HueSaturationValue(10, 30, 20, p=1.0),
                        ]
                    ),
                ],
                p=photometric_p,
            ),
            A.CropAndPad(
                percent=(0.0, pad),
                keep_size=False,
                sample_independently=True,
                fill=fill,
                p=expand_p,
            ),
            IoURandomCrop(p=crop_p),
            A.HorizontalFlip(p=flip_p),
            A.Resize(height, width),
            A.Normalize(mean=mean, std=std),
            ToTensorV2(),
        ],
        bbox_params=_bbox_params(min_visibility),
    )


def eval_transforms(image_size: ImageSize, mean: Mean, std: Mean) -> A.Compose:
    """Resize to (height, width) and normalise with the model's own ``mean``/``std``;
    boxes follow the resize."""
    height, width = int(image_size[0]), int(image_size[1])
    return A.Compose(
        [A.Resize(height, width), A.Normalize(mean=mean, std=std), ToTensorV2()],
        bbox_params=_bbox_params(0.0),
    )
