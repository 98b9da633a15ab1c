"""Postprocessing parameters, with the defaults of torchvision's SSD."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch

ACTIVATIONS = ("softmax", "sigmoid", "none")
# The old spelling of FCOS's score, sqrt(sigmoid(cls) * sigmoid(centerness)): read as
# score_activation="sigmoid" with score_factor_mode="sqrt".
LEGACY_CENTERNESS = "sigmoid_centerness"
SCORE_FACTOR_MODES = ("sqrt", "before_threshold", "after_selection")
LABEL_MODES = ("multi", "single")
SELECTIONS = ("per_class", "per_level", "per_image")
BOX_CODERS = ("box", "linear", "none")
BOX_FORMATS = ("xyxy", "cxcywh")
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
    if type(value) is float or type(value) is int:  # the common cases first (not a bool)
        return float(value)
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
    if type(value) is int and value >= minimum:  # the common case first (not a bool)
        return value
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
            ``"sigmoid"`` per class (RetinaNet, FCOS) or ``"none"`` (the model already
            gives probabilities: exported YOLOv8). The old ``"sigmoid_centerness"``
            (FCOS) is read as ``"sigmoid"`` with ``score_factor_mode="sqrt"``.
        score_factor_mode: how the per-anchor ``score_factor`` tensor given to
            ``postprocess`` (objectness, centerness, IoU quality) f joins the class
            probability p: ``"sqrt"``: sqrt(p * f) (torchvision / detectron2 FCOS),
            ``"before_threshold"``: p * f, then the threshold (YOLOv5, YOLOX),
            ``"after_selection"``: threshold and top-k on p, p * f reported and used
            by NMS (mmdet ATSS, GFL, FCOS). None: no factor.
        score_factor_logits: the factor is a logit (sigmoid applied, as the class
            logits) or, False, a probability used as given.
        label_mode: ``"multi"``: every class that passes; ``"single"``: only each
            anchor's best class (highest score, equal scores to the lower class).
        class_agnostic: NMS over all classes of an image together (else per class).
        classes: allow-list of class columns (the others are never reported); with
            ``label_mode="single"`` the anchor's best class is chosen first, then
            kept only if allowed (ultralytics' ``classes``). None: every column.
        background_class: column of the logits that is never reported, None when
            every column is a real class, or "first" / "last" (column 0 / C - 1).
        clip_boxes: clip decoded boxes to each image's (h, w).
        selection: ``"per_class"``: ``topk_candidates`` per (image, class) (SSD);
            ``"per_level"``: per (image, feature level) over all anchor x class pairs
            (RetinaNet, FCOS, ATSS; needs the anchors per level at call time);
            ``"per_image"``: per image over all anchor x class pairs (EfficientDet,
            YOLO's ``max_nms``).
        box_coder: ``"box"`` (torchvision BoxCoder with ``box_weights``),
            ``"linear"`` (torchvision BoxLinearCoder, normalize_by_size=True) or
            ``"none"``: ``locs`` are already boxes in ``box_format``, no anchors.
        box_format: ``"xyxy"`` or ``"cxcywh"`` (centre, width, height): the layout of
            ``locs`` with ``box_coder="none"``.
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
    score_factor_mode: Optional[str] = None
    score_factor_logits: bool = True
    label_mode: str = "multi"
    class_agnostic: bool = False
    classes: Optional[Tuple[int, ...]] = None
    box_format: str = "xyxy"

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
        if self.score_activation == LEGACY_CENTERNESS:
            if self.score_factor_mode not in (None, "sqrt"):
                raise ValueError(
                    f"score_activation {LEGACY_CENTERNESS!r} means score_factor_mode='sqrt', "
                    f"got score_factor_mode={self.score_factor_mode!r}"
                )
            object.__setattr__(self, "score_activation", "sigmoid")
            object.__setattr__(self, "score_factor_mode", "sqrt")
        if self.classes is not None:
            if isinstance(self.classes, (str, bytes)) or not hasattr(self.classes, "__iter__"):
                raise ValueError(f"classes should be a sequence of ints >= 0, got {self.classes!r}")
            object.__setattr__(
                self, "classes", tuple(whole_scalar(c, "classes", 0) for c in self.classes)
            )
        self.validate()

    def padded_detections(self, num_anchors: int, num_classes: int) -> int:
        """K of the padded outputs of ``postprocess`` for logits [B, A, C]: the most
        detections an image can have. With C_sel the columns that can be reported
        (``classes``, else every column but the background) and P = C_sel * A pairs
        (``label_mode="single"``: A, one per anchor):

        - per_class: min(detections_per_img, C_sel * min(topk_candidates, A)), and
          at most A with ``"single"``; mirrors padded_detections of
          csrc/common/select_params.h for SSD's fused op;
        - per_level: min(detections_per_img, P);
        - per_image: min(detections_per_img, topk_candidates, P).

        A and C may be symbolic sizes under torch.compile."""
        if self.classes is not None:
            selectable = len(self.classes)
        else:
            selectable = num_classes - (0 if self.background_class is None else 1)
        single = self.label_mode == "single"
        if self.selection == "per_class":
            padded = padded_detections(
                self.detections_per_img, self.topk_candidates, num_anchors, selectable
            )
            return _sym_min(padded, num_anchors) if single else padded
        pairs = num_anchors if single else selectable * num_anchors
        if self.selection == "per_image":
            pairs = _sym_min(pairs, self.topk_candidates)
        return _sym_min(self.detections_per_img, pairs)

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
        for name, allowed in (
            ("selection", SELECTIONS),
            ("box_coder", BOX_CODERS),
            ("label_mode", LABEL_MODES),
            ("box_format", BOX_FORMATS),
            ("score_factor_mode", (None,) + SCORE_FACTOR_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} should be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("score_factor_logits", "class_agnostic", "clip_boxes"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} should be a bool, got {getattr(self, name)!r}")
        if self.box_format != "xyxy" and self.box_coder != "none":
            raise ValueError(
                f"box_format is the layout of decoded boxes, for box_coder='none', got "
                f"box_format={self.box_format!r} with box_coder={self.box_coder!r}"
            )
        if self.classes is not None:
            if not self.classes:
                raise ValueError("classes should list at least one class column, got ()")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"classes should not repeat a column, got {self.classes}")
            if isinstance(self.background_class, int) and self.background_class in self.classes:
                raise ValueError(
                    f"classes should not hold the background column {self.background_class}, "
                    f"got {self.classes}"
                )
            if self.background_class == "first" and 0 in self.classes:
                raise ValueError(
                    f"classes should not hold the background column 0 ('first'), got {self.classes}"
                )

    @property
    def uses_fused_per_class_op(self) -> bool:
        """Whether ``postprocess`` runs SSD's fused per-class op (softmax or sigmoid,
        the box coder, per-class NMS of every passing class); every other config runs
        the family's ops (select_topk, decode, batched_nms_padded)."""
        return (
            self.selection == "per_class"
            and self.score_activation in ("softmax", "sigmoid")
            and self.score_factor_mode is None
            and self.label_mode == "multi"
            and not self.class_agnostic
            and self.classes is None
            and self.box_coder == "box"
        )

    def select_topk_arguments(self, num_classes: int) -> tuple:
        """The arguments of ``ssd_post::select_topk`` after ``level_sizes`` that this
        config gives it for ``num_classes`` columns (score_thresh, topk_candidates,
        background_class, score_activation, factor_mode, factor_logits, single_label,
        classes, per_class): one mapping for the ops and the oracle."""
        return (
            self.score_thresh,
            self.topk_candidates,
            self.resolve_background_class(num_classes),
            self.score_activation,
            self.score_factor_mode or "sqrt",
            self.score_factor_logits,
            self.label_mode == "single",
            None if self.classes is None else list(self.classes),
            self.selection == "per_class",
        )

    def resolve_background_class(self, num_classes: int) -> Optional[int]:
        """The background column for logits with ``num_classes`` columns (None: no background)."""
        if self.background_class == "first":
            return 0
        if self.background_class == "last":
            return num_classes - 1
        return self.background_class

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PostprocessConfig":
        """A named configuration of another toolkit's detector (``"mmdet_atss"``,
        ``"mmdet_rtmdet"``, ``"efficientdet"``, ``"yolov5"``, ``"yolox"``,
        ``"yolov8"``; ``ssd_post.presets`` cites the file each follows and the
        tensors each expects), with ``overrides`` replacing fields."""
        from .presets import from_preset

        return from_preset(name, **overrides)

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
            score_activation="sigmoid",
            score_factor_mode="sqrt",
            background_class=None,
            selection="per_level",
            box_coder="linear",
        )


def _sym_min(a, b):
    """min() of ints, or torch.sym_min of symbolic sizes (the fake kernels)."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def padded_detections(detections_per_img, topk_candidates, num_anchors, foreground_classes):
    """min(detections_per_img, foreground_classes * min(topk_candidates, A)); works
    on ints and on torch's symbolic sizes (the fake kernel)."""
    if isinstance(num_anchors, int) and isinstance(foreground_classes, int):
        return min(detections_per_img, foreground_classes * min(topk_candidates, num_anchors))
    return torch.sym_min(
        detections_per_img, foreground_classes * torch.sym_min(topk_candidates, num_anchors)
    )
