"""Modules that wrap a detector or the postprocess alone for the exporters
(ONNX in :mod:`ssd_post.onnx`, AOTInductor in :mod:`ssd_post.aoti`): tensors in,
the five padded detection tensors out, nothing data-dependent in the signature.

Every config traces (the op family has fixed-size outputs and fake kernels), so
both routes take every mode: AOTInductor compiles the traced program, and the ONNX
exporter lowers each op (:mod:`ssd_post.onnx_lowering`).

A whole detector is exportable when it follows :class:`ExportableDetector` (wrapped
by :class:`DetectorModule`) or is a torchvision SSD, SSDLite, RetinaNet or FCOS
(wrapped by :class:`ssd_post.torchvision_export.TorchvisionDetectorModule`);
:func:`exportable_module` picks the wrapper for both exporters."""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor, nn

from .config import PostprocessConfig
from .formats import Detections
from .postprocess import postprocess


def _as_tuple(det: Detections) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    assert det.anchor_indices is not None  # the per-class op always returns them
    return det.boxes, det.scores, det.labels, det.num_detections, det.anchor_indices


def detections_from_outputs(outputs: Sequence[Tensor]) -> Detections:
    """Detections from the outputs of an exported graph or package: boxes, scores,
    labels, num_detections and, when there is a fifth, anchor_indices (integer
    outputs made int64: a runtime may hand back int32)."""
    if len(outputs) not in (4, 5):
        raise ValueError(f"an exported postprocess has 4 or 5 outputs, got {len(outputs)}")
    boxes, scores, labels, counts = outputs[:4]
    anchors = outputs[4].long() if len(outputs) == 5 else None
    return Detections(boxes, scores, labels.long(), counts.long(), anchors)


def batch_dynamic_shapes(module: nn.Module, args: Sequence[Tensor], batch) -> tuple:
    """``torch.export``'s dynamic_shapes making dim 0 of every input ``batch``: one
    spec per parameter of ``module.forward``, or one tuple of them when it takes
    ``*inputs`` (PostprocessModule, whose inputs depend on its config)."""
    specs = tuple({0: batch} for _ in args)
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return (specs,)
    return specs


def postprocess_input_names(config: PostprocessConfig, score_factor: bool = False) -> List[str]:
    """The inputs of an exported postprocess, in order: locs and logits; image_sizes
    when the config clips (and always for SSD's fused op, which takes them); then
    score_factor when the model gives one."""
    names = ["locs", "logits"]
    if config.clip_boxes or config.uses_fused_per_class_op:
        names.append("image_sizes")
    if score_factor:
        names.append("score_factor")
    return names


class PostprocessModule(nn.Module):
    """Head outputs -> padded detections, the postprocess alone as an exportable
    module, for any config.

    ``forward(*inputs)`` takes :attr:`input_names` in order (see
    :func:`postprocess_input_names`): locs [B, A, 4] (regressions, or boxes with
    ``box_coder="none"``), logits [B, A, C], image_sizes [B, 2] int64 (h, w) and
    score_factor [B, A] or [B, A, 1]. It returns boxes [B, K, 4] float32, scores
    [B, K] float32, labels [B, K] int64, num_detections [B] int64 and anchor_indices
    [B, K] int64 (-1 in padding rows), K = ``config.padded_detections(A, C)`` as for
    :func:`ssd_post.postprocess`, in eager, in the ONNX graph and in an AOTInductor
    package alike.

    Args:
        anchors (Tensor[A, 4] or None): baked in; None with ``box_coder="none"``.
        config: any PostprocessConfig.
        level_sizes: anchors per feature level, for ``selection="per_level"``.
        score_factor: whether the model gives a per-anchor score factor.
    """

    def __init__(
        self,
        anchors: Optional[Tensor],
        config: PostprocessConfig,
        level_sizes: Optional[Sequence[int]] = None,
        score_factor: bool = False,
    ) -> None:
        super().__init__()
        anchors = None if anchors is None else anchors.detach().float().clone()
        self.register_buffer("anchors", anchors, persistent=False)
        self.config = config
        self.level_sizes = None if level_sizes is None else [int(n) for n in level_sizes]
        self.input_names = postprocess_input_names(config, score_factor)

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        named = dict(zip(self.input_names, inputs))
        return _as_tuple(
            postprocess(
                named["locs"],
                named["logits"],
                self.anchors,
                named.get("image_sizes"),
                self.config,
                level_sizes=self.level_sizes,
                score_factor=named.get("score_factor"),
            )
        )


def postprocess_module(
    anchors: Optional[Tensor],
    config: PostprocessConfig,
    example_locs: Tensor,
    example_logits: Tensor,
    example_image_sizes: Optional[Tensor] = None,
    *,
    level_sizes: Optional[Sequence[int]] = None,
    example_score_factor: Optional[Tensor] = None,
) -> Tuple["PostprocessModule", Tuple[Tensor, ...]]:
    """The :class:`PostprocessModule` of ``config`` and its example inputs in its
    input order, for either exporter: a ValueError names an input the config takes
    but was not given."""
    module = PostprocessModule(anchors, config, level_sizes, example_score_factor is not None)
    given = {
        "locs": example_locs,
        "logits": example_logits,
        "image_sizes": example_image_sizes,
        "score_factor": example_score_factor,
    }
    missing = [name for name in module.input_names if given[name] is None]
    if missing:
        raise ValueError(f"this config's postprocess takes {module.input_names}; give {missing}")
    return module, tuple(given[name] for name in module.input_names)


class YoloPostprocessModule(nn.Module):
    """YOLOv8 / YOLO11 prediction [B, 4 + nc + nm, N] -> padded detections: the
    postprocess of :func:`ssd_post.non_max_suppression` as an exportable module, to
    append to a network exported elsewhere.

    ``forward(prediction)`` returns boxes [B, K, 4] float32 xyxy, scores [B, K]
    float32, labels [B, K] int64, num_detections [B] int64 and anchor_indices [B, K]
    int64 (-1 in padding rows; the columns of ``prediction`` the detections come
    from, to gather the nm mask coefficients or keypoints), K =
    ``config.padded_detections(N, nc)``. Image i's first ``num_detections[i]`` rows
    are ``non_max_suppression``'s rows for that image, in its order.

    Args:
        num_classes: nc, the class columns after the four box columns.
        conf_thres, iou_thres, classes, agnostic, multi_label, max_det, max_nms:
            ``non_max_suppression``'s arguments (``multi_label=True``: validation).

    The best class of an anchor (``multi_label=False``) is chosen as
    ``select_topk``'s single label: a NaN class probability is skipped, where
    ``non_max_suppression`` drops the anchor (torch.max's rule); finite
    predictions give the same detections.
    """

    input_names = ["prediction"]

    def __init__(
        self,
        num_classes: int,
        conf_thres: float = 0.25,
        iou_thres: float = 0.45,
        classes: Optional[Sequence[int]] = None,
        agnostic: bool = False,
        multi_label: bool = False,
        max_det: int = 300,
        max_nms: int = 30000,
    ) -> None:
        super().__init__()
        from .config import whole_scalar
        from .yolo import checked_classes, matching_classes, yolo_config

        self.num_classes = whole_scalar(num_classes, "num_classes")
        if classes is not None:
            given = checked_classes(classes)
            classes = matching_classes(given, self.num_classes)  # non_max_suppression's rule
            if not classes:
                raise ValueError(
                    f"classes should name at least one of the nc = {self.num_classes} "
                    f"class columns, got {sorted(set(given))}"
                )
        for name, flag in (("agnostic", agnostic), ("multi_label", multi_label)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} should be a bool, got {flag!r}")
        self.config = yolo_config(
            conf_thres, iou_thres, classes, agnostic, multi_label, max_det, max_nms
        )

    def forward(self, prediction: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        torch._check(
            prediction.dim() == 3 and prediction.shape[1] >= 4 + self.num_classes,
            lambda: f"prediction should be [B, 4 + nc + nm, N] with nc = {self.num_classes}",
        )
        if prediction.dtype == torch.float64:  # scored in float32, as non_max_suppression does
            prediction = prediction.float()
        # Views of the [B, 4 + nc + nm, N] layout as the family's [B, N, 4] and [B, N, nc].
        return _as_tuple(
            postprocess(
                prediction[:, :4].mT,
                prediction[:, 4 : 4 + self.num_classes].mT,
                None,
                None,
                self.config,
            )
        )


def yolo_postprocess_module(
    example_prediction: Tensor, nc: int = 0, **nms
) -> YoloPostprocessModule:
    """The :class:`YoloPostprocessModule` for predictions shaped like
    ``example_prediction`` [B, 4 + nc + nm, N] (``nc=0``: every column after the
    box is a class, as in ``non_max_suppression``); ``nms`` are its other arguments."""
    from .config import whole_scalar

    if not isinstance(example_prediction, Tensor) or example_prediction.dim() != 3:
        raise ValueError(
            "example_prediction should be a Tensor [B, 4 + nc + nm, N], got "
            f"{getattr(example_prediction, 'shape', type(example_prediction).__name__)}"
        )
    channels = example_prediction.shape[1]
    nc = whole_scalar(nc, "nc", minimum=0) or channels - 4
    if not 1 <= nc <= channels - 4:
        raise ValueError(
            f"nc should be in [1, channels - 4] = [1, {channels - 4}] for example_prediction "
            f"of shape {tuple(example_prediction.shape)}, got {nc}"
        )
    return YoloPostprocessModule(nc, **nms)


@runtime_checkable
class ExportableDetector(Protocol):
    """What a detector provides to be exported with its postprocess by
    :func:`ssd_post.onnx.export` and :func:`ssd_post.aoti.export_package` (the
    repository's ``SingleStageDetector`` is one). It is an ``nn.Module`` with:

    - ``forward(images)``: images [B, 3, H, W] as the network takes them (at
      ``image_size``, resized and normalised) -> ``(locs [B, A, 4], logits [B, A, C])``,
      or ``(locs, logits, score_factor [B, A] or [B, A, 1])`` for a head with a
      per-anchor factor (centerness, objectness), as ``ssd_post.postprocess`` takes them;
    - ``postprocess_config``: the :class:`~ssd_post.PostprocessConfig` of its postprocess;
    - ``anchors()``: Tensor[A, 4] xyxy anchors at ``image_size`` (baked into the
      export), or None with ``box_coder="none"``;
    - ``image_size``: the network input (h, w), fixed at export;
    - optionally ``postprocess_inputs()``: the keyword inputs of ``ssd_post.postprocess``
      besides the tensors, e.g. ``{"level_sizes": [...]}`` for a per-level selection.

    Boxes come out in network-input pixels (clipped to ``image_size`` when the
    config clips).
    """

    postprocess_config: PostprocessConfig
    image_size: Tuple[int, int]

    def __call__(self, images: Tensor) -> Tuple[Tensor, ...]: ...

    def anchors(self) -> Optional[Tensor]: ...


# What check_detector and the exporters' errors say a detector must provide.
PROTOCOL_SUMMARY = (
    "ssd_post.exportable.ExportableDetector (an nn.Module with forward(images) -> "
    "(locs, logits[, score_factor]), postprocess_config: PostprocessConfig, "
    "anchors() -> Tensor[A, 4] and image_size: (h, w))"
)


def missing_members(model: Any) -> List[str]:
    """What ``model`` lacks of :class:`ExportableDetector`, in words (empty: nothing)."""
    missing = []
    if not isinstance(model, nn.Module):
        missing.append("being an nn.Module")
    config = getattr(model, "postprocess_config", None)
    if config is None:
        missing.append("postprocess_config")
    elif not isinstance(config, PostprocessConfig):
        missing.append(
            f"postprocess_config as a PostprocessConfig (it is a {type(config).__name__})"
        )
    if not callable(getattr(model, "anchors", None)):
        missing.append("anchors()")
    size = getattr(model, "image_size", None)
    if size is None:
        missing.append("image_size")
    elif not _is_size(size):
        missing.append(f"image_size as two positive ints (h, w) (it is {size!r})")
    return missing


def _is_size(size: Any) -> bool:
    """Whether ``size`` is two positive ints (a tuple, list or torch.Size)."""
    try:
        return len(size) == 2 and all(int(v) == v and int(v) > 0 for v in size)
    except (TypeError, ValueError):
        return False


def check_detector(model: Any, alternative: Optional[str] = None) -> None:
    """Raises TypeError unless ``model`` follows :class:`ExportableDetector`, naming
    what it lacks (any postprocess config) and ``alternative``, what else the caller
    would have taken."""
    missing = missing_members(model)
    if missing:
        if alternative is None:
            raise TypeError(
                f"model should implement {PROTOCOL_SUMMARY}; got {type(model).__name__}, "
                f"which lacks {', '.join(missing)}"
            )
        raise TypeError(
            f"model should implement {PROTOCOL_SUMMARY}, or be {alternative}; got "
            f"{type(model).__name__}, which is neither: it lacks {', '.join(missing)}"
        )


def check_example_images(images: Any) -> Tuple[int, int]:
    """Raises ValueError unless ``images`` is a floating Tensor[B, 3, H, W] with B, H,
    W >= 1; returns (H, W)."""
    if not isinstance(images, Tensor):
        raise ValueError(
            f"example_images should be a Tensor[B, 3, H, W], got {type(images).__name__}"
        )
    if images.dim() != 4 or images.shape[1] != 3 or images.numel() == 0:
        raise ValueError(
            "example_images should be a Tensor[B, 3, H, W] (three colour channels, "
            f"B, H, W >= 1), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"example_images should be floating point, got {images.dtype}")
    return int(images.shape[2]), int(images.shape[3])


class DetectorModule(nn.Module):
    """Images [B, 3, H, W] (at ``image_size``, resized and normalised) -> padded
    detections of an :class:`ExportableDetector`: boxes [B, K, 4] float32, scores
    [B, K] float32, labels [B, K] int64, num_detections [B] int64 and
    anchor_indices [B, K] int64 (-1 in padding rows)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        check_detector(detector)
        self.detector = detector
        self.config = detector.postprocess_config
        # level_sizes for a per-level head (fixed by the export size), nothing for SSD.
        self.postprocess_inputs = dict(getattr(detector, "postprocess_inputs", dict)())
        anchors = detector.anchors()
        anchors = None if anchors is None else anchors.detach().float().clone()
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer(
            "image_size",
            torch.tensor([list(detector.image_size)], dtype=torch.int64),
            persistent=False,
        )

    def head_outputs(self, images: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """locs [B, A, 4], logits [B, A, C] and the score factor [B, A(, 1)] or None."""
        outputs = self.detector(images)
        if not isinstance(outputs, (tuple, list)) or len(outputs) not in (2, 3):
            got = type(outputs).__name__
            if isinstance(outputs, (tuple, list)):
                got += f" of {len(outputs)}"
            raise ValueError(
                "the detector's forward should return (locs, logits) or "
                f"(locs, logits, score_factor), got a {got}"
            )
        return outputs[0], outputs[1], outputs[2] if len(outputs) == 3 else None

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        locs, logits, score_factor = self.head_outputs(images)
        sizes = self.image_size.expand(images.shape[0], 2)
        return _as_tuple(
            postprocess(
                locs,
                logits,
                self.anchors,
                sizes,
                self.config,
                score_factor=score_factor,
                **self.postprocess_inputs,
            )
        )


def is_torchvision_detector(model: Any) -> bool:
    """Whether ``model`` is a torchvision SSD (SSDLite included), RetinaNet or FCOS.
    torchvision is imported only for a model whose class comes from it."""
    if not any(c.__module__.split(".")[0] == "torchvision" for c in type(model).__mro__):
        return False
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return isinstance(model, (SSD, RetinaNet, FCOS))


def exportable_module(model: nn.Module, example_images: Tensor) -> nn.Module:
    """The module :func:`ssd_post.onnx.export` and :func:`ssd_post.aoti.export_package`
    export for ``model``: images [B, 3, H, W] in; boxes [B, K, 4] float32, scores
    [B, K] float32, labels [B, K] int64, num_detections [B] int64 and anchor_indices
    [B, K] int64 (-1 in padding rows) out, K = ``config.padded_detections(A, C)``.
    Either module has ``config`` (its PostprocessConfig) and ``head_outputs(images)``
    (locs, logits, score factor or None).

    Args:
        model: an :class:`ExportableDetector` (images at its ``image_size``, resized
            and normalised; boxes in those pixels) -> :class:`DetectorModule`; or a
            torchvision SSD, SSDLite, RetinaNet or FCOS in eval mode (images in
            [0, 1] at the size of ``example_images``; the model's own normalisation
            and resize run inside and boxes come back in the given images' pixels, as
            ``model(list(images))`` gives them) ->
            :class:`ssd_post.torchvision_export.TorchvisionDetectorModule`.
        example_images (Tensor[B, 3, H, W]): floating point; (H, W) is fixed at export.

    Raises:
        TypeError: ``model`` is neither (the message names what it lacks).
        ValueError: bad example images, or a torchvision model in training mode.
    """
    if is_torchvision_detector(model):
        from .torchvision_export import TorchvisionDetectorModule

        return TorchvisionDetectorModule(model, example_images)
    check_detector(model, "a torchvision SSD, SSDLite, RetinaNet or FCOS")
    size = check_example_images(example_images)
    expected = tuple(int(v) for v in model.image_size)
    if size != expected:
        raise ValueError(
            f"example_images should be at the detector's image_size {expected} (h, w), got {size}"
        )
    return DetectorModule(model)
