"""Postprocessing parameters, with the defaults of torchvision's SSD."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

ACTIVATIONS = ("softmax", "sigmoid", "sigmoid_centerness")
SELECTIONS = ("per_class", "per_level")
BOX_CODERS = ("box", "linear")
# mmdet's spelling of the background column: "first" is column 0, "last" is C - 1.
BACKGROUND_NAMES = ("first", "last")


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
    """

    score_thresh: float = 0.01
    nms_thresh: float = 0.45
    topk_candidates: int = 400
    detections_per_img: int = 200
    box_weights: Tuple[float, float, float, float] = field(default=(10.0, 10.0, 5.0, 5.0))
    score_activation: str = "softmax"
    background_class: Optional[Union[int, str]] = 0
    clip_boxes: bool = True
    selection: str = "per_class"
    box_coder: str = "box"

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
        for name, allowed in (("selection", SELECTIONS), ("box_coder", BOX_CODERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} should be one of {allowed}, got {getattr(self, name)!r}")
        # The fused per-class op has only the softmax/sigmoid scores and the box coder.
        if self.selection == "per_class" and self.score_activation == "sigmoid_centerness":
            raise ValueError("score_activation 'sigmoid_centerness' needs selection='per_level', got 'per_class'")
        if self.selection == "per_class" and self.box_coder == "linear":
            raise ValueError("box_coder 'linear' needs selection='per_level', got 'per_class'")
        if self.background_class in BACKGROUND_NAMES:
            return
        if self.background_class is not None and (
            not isinstance(self.background_class, int)
            or isinstance(self.background_class, bool)
            or self.background_class < 0
        ):
            raise ValueError(
                f"background_class should be None, an int >= 0, 'first' or 'last', "
                f"got {self.background_class!r}"
            )

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
            raise ValueError(f"model should be a torchvision SSD, RetinaNet or FCOS, got {type(model).__name__}")
        common = dict(
            score_thresh=float(model.score_thresh),
            nms_thresh=float(model.nms_thresh),
            topk_candidates=int(model.topk_candidates),
            detections_per_img=int(model.detections_per_img),
            clip_boxes=True,
        )
        if isinstance(model, SSD):
            return cls(**common, box_weights=tuple(float(w) for w in model.box_coder.weights),
                       score_activation="softmax", background_class=0)
        if isinstance(model, RetinaNet):
            return cls(**common, box_weights=tuple(float(w) for w in model.box_coder.weights),
                       score_activation="sigmoid", background_class=None, selection="per_level")
        if not getattr(model.box_coder, "normalize_by_size", False):
            raise ValueError("FCOS model should use BoxLinearCoder(normalize_by_size=True), got "
                             f"normalize_by_size={getattr(model.box_coder, 'normalize_by_size', None)!r}")
        return cls(**common, score_activation="sigmoid_centerness", background_class=None,
                   selection="per_level", box_coder="linear")
