"""Postprocessing parameters, with the defaults of torchvision's SSD."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

ACTIVATIONS = ("softmax", "sigmoid")
# What to do with a box whose corners are not x1 <= x2, y1 <= y2 (ssd_post.corners).
INVERTED_BOXES = ("keep", "sort", "raise")


def real_scalar(value, name: str) -> float:
    """``value`` as a Python float: any real number that converts exactly (int,
    float, numpy scalar, 0-d tensor); bools and anything else are refused with a
    ValueError naming ``name``. NaN passes here: range checks refuse it."""
    if isinstance(value, torch.Tensor):  # only 0-d and real
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} should be a float (a real number), got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} should be a float (a real number), got {value!r}")
    converted = float(value)
    if not isinstance(value, (float, int)) and not math.isnan(converted) and converted != value:
        raise ValueError(f"{name} should convert exactly to a float, got {value!r}")
    return converted


def unit_scalar(value, name: str) -> float:
    """``real_scalar`` in [0, 1]; NaN is refused with a message naming ``name``."""
    converted = real_scalar(value, name)
    if not 0.0 <= converted <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} should be in [0, 1], got {converted}")
    return converted


def whole_scalar(value, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``: ints, numpy integers and 0-d
    integer tensors; bools and floats are refused with a ValueError naming ``name``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{name} should be an int >= {minimum}, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_floating_point() or value.is_complex() or \
                value.dtype == torch.bool:
            raise ValueError(f"{name} should be an int >= {minimum}, got a tensor of shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    try:
        converted = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} should be an int >= {minimum}, got {value!r}") from None
    if converted < minimum:
        raise ValueError(f"{name} should be an int >= {minimum}, got {converted}")
    return converted


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
        inverted_boxes: boxes are x1 <= x2, y1 <= y2. A box (here: an anchor, which
            decodes into the box) that is not: ``"keep"`` it as given, with zero
            area, so it suppresses nothing (torchvision); ``"sort"`` its corners
            first (ONNX / TensorFlow NMS); ``"raise"`` a ValueError.

    The thresholds accept any real number that converts exactly (numpy scalars,
    0-d tensors) and are stored as floats; the counts accept any int >= 1, however
    large ("no limit"): buffers are sized by the data, and the padded outputs of
    ``postprocess`` have K = :meth:`padded_detections` rows per image.
    """

    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    topk_candidates: int = 400
    detections_per_img: int = 200
    box_weights: Tuple[float, float, float, float] = field(default=(10.0, 10.0, 5.0, 5.0))
    score_activation: str = "softmax"
    background_class: Optional[int] = 0
    clip_boxes: bool = True
    inverted_boxes: str = "keep"

    def __post_init__(self) -> None:
        for name in ("score_thresh", "nms_thresh"):
            object.__setattr__(self, name, unit_scalar(getattr(self, name), name))
        for name in ("topk_candidates", "detections_per_img"):
            object.__setattr__(self, name, whole_scalar(getattr(self, name), name))
        if self.background_class is not None:
            object.__setattr__(self, "background_class",
                               whole_scalar(self.background_class, "background_class", 0))
        try:
            weights = tuple(real_scalar(w, "box_weights") for w in self.box_weights)
        except TypeError:
            raise ValueError(f"box_weights should be 4 finite positive floats, got "
                             f"{self.box_weights!r}") from None
        object.__setattr__(self, "box_weights", weights)
        self.validate()

    def padded_detections(self, num_anchors: int, num_classes: int) -> int:
        """K of the padded outputs of ``postprocess`` for logits [B, A, C]: an image
        has at most C_fg * min(topk_candidates, A) candidates, so
        K = min(detections_per_img, C_fg * min(topk_candidates, A)) with C_fg the
        foreground classes. Mirrors padded_detections of csrc/common/select_params.h
        (A and C may be symbolic sizes under torch.compile)."""
        foreground = num_classes - (0 if self.background_class is None else 1)
        return padded_detections(self.detections_per_img, self.topk_candidates, num_anchors,
                                 foreground)

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name in ("score_thresh", "nms_thresh"):
            unit_scalar(getattr(self, name), name)
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
        if self.inverted_boxes not in INVERTED_BOXES:
            raise ValueError(
                f"inverted_boxes should be one of {INVERTED_BOXES}, got {self.inverted_boxes!r}"
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


def padded_detections(detections_per_img, topk_candidates, num_anchors, foreground_classes):
    """min(detections_per_img, foreground_classes * min(topk_candidates, A)); works
    on ints and on torch's symbolic sizes (the fake kernel)."""
    if isinstance(num_anchors, int) and isinstance(foreground_classes, int):
        return min(detections_per_img, foreground_classes * min(topk_candidates, num_anchors))
    return torch.sym_min(detections_per_img,
                         foreground_classes * torch.sym_min(topk_candidates, num_anchors))
