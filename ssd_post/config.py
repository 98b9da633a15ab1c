"""Postprocessing parameters, with the defaults of torchvision's SSD."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

ACTIVATIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class PostprocessConfig:
    """Everything the postprocess needs besides the tensors.

    Attributes:
        score_thresh: keep a (anchor, class) score only when ``score > score_thresh``.
        nms_thresh: suppress a box whose IoU with a kept box of the same image and
            class is ``> nms_thresh``.
        topk_candidates: per (image, class), at most this many highest scores go to NMS.
        detections_per_img: per image, keep this many highest-scoring NMS survivors.
        box_weights: (wx, wy, ww, wh) of the box coder; (10, 10, 5, 5) are SSD's
            variances (0.1, 0.2).
        score_activation: ``"softmax"`` over all classes (torchvision SSD) or
            ``"sigmoid"`` per class.
        background_class: column of the logits that is never reported, or None when
            every column is a real class.
        clip_boxes: clip decoded boxes to each image's (h, w).
    """

    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    topk_candidates: int = 400
    detections_per_img: int = 200
    box_weights: Tuple[float, float, float, float] = field(default=(10.0, 10.0, 5.0, 5.0))
    score_activation: str = "softmax"
    background_class: Optional[int] = 0
    clip_boxes: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "box_weights", tuple(float(w) for w in self.box_weights))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name in ("score_thresh", "nms_thresh"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{name} should be a float in [0, 1], got {value!r}")
            if not (0.0 <= float(value) <= 1.0):  # also rejects NaN
                raise ValueError(f"{name} should be in [0, 1], got {value}")
        for name in ("topk_candidates", "detections_per_img"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} should be an int >= 1, got {value!r}")
        if len(self.box_weights) != 4 or not all(
            math.isfinite(w) and w > 0 for w in self.box_weights
        ):
            raise ValueError(
                f"box_weights should be 4 finite positive floats, got {self.box_weights}"
            )
        if self.score_activation not in ACTIVATIONS:
            raise ValueError(
                f"score_activation should be one of {ACTIVATIONS}, got {self.score_activation!r}"
            )
        if self.background_class is not None and (
            not isinstance(self.background_class, int)
            or isinstance(self.background_class, bool)
            or self.background_class < 0
        ):
            raise ValueError(
                f"background_class should be None or an int >= 0, got {self.background_class!r}"
            )

    @classmethod
    def from_torchvision(cls, model) -> "PostprocessConfig":
        """Read the postprocess parameters off a torchvision ``SSD`` model
        (``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large``)."""
        for attr in ("score_thresh", "nms_thresh", "topk_candidates", "detections_per_img", "box_coder"):
            if not hasattr(model, attr):
                raise ValueError(
                    f"model should be a torchvision SSD with attribute {attr!r}, got {type(model).__name__}"
                )
        return cls(
            score_thresh=float(model.score_thresh),
            nms_thresh=float(model.nms_thresh),
            topk_candidates=int(model.topk_candidates),
            detections_per_img=int(model.detections_per_img),
            box_weights=tuple(float(w) for w in model.box_coder.weights),
            score_activation="softmax",
            background_class=0,
            clip_boxes=True,
        )
