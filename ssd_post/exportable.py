"""Modules that wrap a detector or the postprocess alone for the exporters
(ONNX in :mod:`ssd_post.onnx`, AOTInductor in :mod:`ssd_post.aoti`): tensors in,
the five padded detection tensors out, nothing data-dependent in the signature.

Every config traces (the op family has fixed-size outputs and fake kernels), so
AOTInductor takes every mode; the ONNX lowering covers SSD's fused per-class op
only (:func:`check_onnx_config`)."""

from __future__ import annotations

import inspect
from typing import Any, List, Optional, Sequence, Tuple

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


class DetectorModule(nn.Module):
    """Images [B, 3, H, W] (resized, normalised) -> padded detections of a SingleStageDetector."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        check_detector(detector)
        self.detector = detector
        self.config = detector.postprocess_config
        # level_sizes for a per-level head (fixed by the export size), nothing for SSD.
        self.postprocess_inputs = dict(getattr(detector, "postprocess_inputs", dict)())
        self.register_buffer(
            "anchors", detector.anchors().detach().float().clone(), persistent=False
        )
        self.register_buffer(
            "image_size",
            torch.tensor([list(detector.image_size)], dtype=torch.int64),
            persistent=False,
        )

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        locs, logits = self.detector(images)
        sizes = self.image_size.expand(images.shape[0], 2)
        return _as_tuple(
            postprocess(locs, logits, self.anchors, sizes, self.config, **self.postprocess_inputs)
        )


def check_onnx_config(config: PostprocessConfig) -> None:
    """Raises ValueError for a postprocess the ONNX lowering does not cover: it lowers
    SSD's one fused op (``config.uses_fused_per_class_op``); the rest of the family
    (per-level and per-image selection, score factors, single labels, class-agnostic
    NMS, an allow-list, decoded boxes) runs select_topk and batched_nms_padded, which
    have no ONNX lowering yet (AOTInductor packages take every config)."""
    if not config.uses_fused_per_class_op:
        raise ValueError(
            "the ONNX export covers SSD's fused per-class op (selection='per_class', "
            "softmax or sigmoid, box coder 'box', no score factor, multi-label, per-class "
            f"NMS, no classes allow-list); this config (selection={config.selection!r}, "
            f"score_activation={config.score_activation!r}, "
            f"score_factor_mode={config.score_factor_mode!r}, label_mode={config.label_mode!r}, "
            f"class_agnostic={config.class_agnostic}, box_coder={config.box_coder!r}) "
            "cannot be exported to ONNX yet; ssd_post.aoti packages take it"
        )


def check_detector(model: Any) -> None:
    """Raises TypeError unless ``model`` is a SingleStageDetector-like module (models/ of
    the repository) postprocessed by ssd_post (any config: the ONNX route checks
    :func:`check_onnx_config` itself)."""
    needed = ("postprocess_config", "anchors", "image_size")
    if (
        not isinstance(model, nn.Module)
        or not all(hasattr(model, a) for a in needed)
        or not isinstance(getattr(model, "postprocess_config"), PostprocessConfig)
    ):
        raise TypeError(
            "model should be a SingleStageDetector (models.build_model / "
            "models.checkpoint.load_detector) whose "
            f"postprocess is ssd_post.postprocess, got {type(model).__name__}"
        )
