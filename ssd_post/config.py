"""Postprocessing parameters, with the defaults of torchvision's SSD."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch

ACTIVATIONS = ("softmax", "sigmoid", "sigmoid_centerness")
SELECTIONS = ("per_class", "per_level")
BOX_CODERS = ("box", "linear")
# mmdet's spelling of the background column: "first" is column 0, "last" is C - 1.
BACKGROUND_NAMES = ("first", "last")


def inverted_boxes_modes() -> List[str]:
    """What may be done with a box whose corners are not x1 <= x2, y1 <= y2
    (ssd_post.corners). A function, because TorchScript compiles a call but cannot
    read a module-level tuple."""
    return ["keep", "sort", "raise"]


INVERTED_BOXES = tuple(inverted_boxes_modes())


def real_scalar(value, name: str) -> float:
    """``value`` as a Python float: any real number that converts exactly (int,
    float, numpy scalar, 0-d tensor); bools and anything else are refused with a
    ValueError naming ``name``. NaN passes here: range checks refuse it."""
    if isinstance(value, torch.Tensor):  # only 0-d and real
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{name} should be a float (a real number), got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        value = value.item()
    if (
        isinstance(value, bool)
        or type(value).__name__ == "bool_"
        or not isinstance(value, numbers.Real)
    ):
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
        if (
            value.dim() != 0
            or value.is_floating_point()
            or value.is_complex()
            or value.dtype == torch.bool
        ):
            raise ValueError(
                f"{name} should be an int >= {minimum}, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
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
        score_activation: ``"softmax"`` over all classes (torchvision SSD),
            ``"sigmoid"`` per class (RetinaNet) or ``"sigmoid_centerness"``:
            sqrt(sigmoid(class logit) * sigmoid(centerness logit)) (FCOS).
        background_class: column of the logits that is never reported, None when
            every column is a real class, or "first" / "last" (column 0 / C - 1).
        clip_boxes: clip decoded boxes to each image's (h, w).
        selection: ``"per_class"``: ``topk_candidates`` per (image, class) (SSD);
            ``"per_level"``: per (image, feature level) over all anchor x class pairs
            (RetinaNet, FCOS; needs the anchors per level at call time).
        box_coder: ``"box"`` (torchvision BoxCoder with ``box_weights``) or
            ``"linear"`` (torchvision BoxLinearCoder, normalize_by_size=True).
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
    background_class: Optional[Union[int, str]] = 0
    clip_boxes: bool = True
    inverted_boxes: str = "keep"
    selection: str = "per_class"
    box_coder: str = "box"

    def __post_init__(self) -> None:
        for name in ("score_thresh", "nms_thresh"):
            object.__setattr__(self, name, unit_scalar(getattr(self, name), name))
        for name in ("topk_candidates", "detections_per_img"):
            object.__setattr__(self, name, whole_scalar(getattr(self, name), name))
        if self.background_class is not None and self.background_class not in BACKGROUND_NAMES:
            if isinstance(self.background_class, str):
                raise ValueError(
                    f"background_class should be None, an int >= 0, 'first' or 'last', "
                    f"got {self.background_class!r}"
                )
            object.__setattr__(
                self, "background_class", whole_scalar(self.background_class, "background_class", 0)
            )
        try:
            weights = tuple(real_scalar(w, "box_weights") for w in self.box_weights)
        except TypeError:
            raise ValueError(
                f"box_weights should be 4 finite positive floats, got {self.box_weights!r}"
            ) from None
        object.__setattr__(self, "box_weights", weights)
        self.validate()

    def padded_detections(self, num_anchors: int, num_classes: int) -> int:
        """K of the padded outputs of ``postprocess`` for logits [B, A, C]: an image
        has at most C_fg * min(topk_candidates, A) candidates, so
        K = min(detections_per_img, C_fg * min(topk_candidates, A)) with C_fg the
        foreground classes. Mirrors padded_detections of csrc/common/select_params.h
        (A and C may be symbolic sizes under torch.compile). With
        ``selection="per_level"``: K = min(detections_per_img, C_fg * A)."""
        foreground = num_classes - (0 if self.background_class is None else 1)
        if self.selection == "per_level":
            # Every (anchor, foreground class) pair can be a candidate of its level.
            return min(self.detections_per_img, foreground * num_anchors)
        return padded_detections(
            self.detections_per_img, self.topk_candidates, num_anchors, foreground
        )

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
        for name, allowed in (("selection", SELECTIONS), ("box_coder", BOX_CODERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} should be one of {allowed}, got {getattr(self, name)!r}")
        # The fused per-class op has only the softmax/sigmoid scores and the box coder.
        if self.selection == "per_class" and self.score_activation == "sigmoid_centerness":
            raise ValueError(
                "score_activation 'sigmoid_centerness' needs selection='per_level', got 'per_class'"
            )
        if self.selection == "per_class" and self.box_coder == "linear":
            raise ValueError("box_coder 'linear' needs selection='per_level', got 'per_class'")

    def resolve_background_class(self, num_classes: int) -> Optional[int]:
        """The background column for logits with ``num_classes`` columns (None: no background)."""
        if self.background_class == "first":
            return 0
        if self.background_class == "last":
            return num_classes - 1
        return self.background_class

    @classmethod
    def from_torchvision(cls, model) -> "PostprocessConfig":
        """Read the postprocess parameters off a torchvision ``SSD`` (``ssd300_vgg16``,
        ``ssdlite320_mobilenet_v3_large``), ``RetinaNet`` (``retinanet_resnet50_fpn``,
        ``_v2``) or ``FCOS`` (``fcos_resnet50_fpn``) model."""
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.models.detection.ssd import SSD

        if not isinstance(model, (SSD, RetinaNet, FCOS)):
            raise ValueError(
                f"model should be a torchvision SSD, RetinaNet or FCOS, got {type(model).__name__}"
            )
        common = dict(
            score_thresh=float(model.score_thresh),
            nms_thresh=float(model.nms_thresh),
            topk_candidates=int(model.topk_candidates),
            detections_per_img=int(model.detections_per_img),
            clip_boxes=True,
        )
        if isinstance(model, SSD):
            return cls(
                **common,
                box_weights=tuple(float(w) for w in model.box_coder.weights),
                score_activation="softmax",
                background_class=0,
            )
        if isinstance(model, RetinaNet):
            return cls(
                **common,
                box_weights=tuple(float(w) for w in model.box_coder.weights),
                score_activation="sigmoid",
                background_class=None,
                selection="per_level",
            )
        if not getattr(model.box_coder, "normalize_by_size", False):
            raise ValueError(
                "FCOS model should use BoxLinearCoder(normalize_by_size=True), got "
                f"normalize_by_size={getattr(model.box_coder, 'normalize_by_size', None)!r}"
            )
        return cls(
            **common,
            score_activation="sigmoid_centerness",
            background_class=None,
            selection="per_level",
            box_coder="linear",
        )


def padded_detections(detections_per_img, topk_candidates, num_anchors, foreground_classes):
    """min(detections_per_img, foreground_classes * min(topk_candidates, A)); works
    on ints and on torch's symbolic sizes (the fake kernel)."""
    if isinstance(num_anchors, int) and isinstance(foreground_classes, int):
        return min(detections_per_img, foreground_classes * min(topk_candidates, num_anchors))
    return torch.sym_min(
        detections_per_img, foreground_classes * torch.sym_min(topk_candidates, num_anchors)
    )
