"""Modules that wrap a detector or the postprocess alone for the exporters
(ONNX in :mod:`ssd_post.onnx`, AOTInductor in :mod:`ssd_post.aoti`): tensors in,
the five padded detection tensors out, nothing data-dependent in the signature."""

from __future__ import annotations

from typing import Any, Sequence, Tuple

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


class PostprocessModule(nn.Module):
    """Head outputs -> padded detections, the postprocess alone as an exportable module.

    ``forward(locs [B, A, 4], logits [B, A, C], image_sizes [B, 2] int64 (h, w))``
    returns boxes [B, K, 4] float32, scores [B, K] float32, labels [B, K] int64,
    num_detections [B] int64 and anchor_indices [B, K] int64 (-1 in padding rows),
    K = ``config.padded_detections(A, C)`` as for :func:`ssd_post.postprocess`, in
    eager, in the ONNX graph and in an AOTInductor package alike.
    """

    def __init__(self, anchors: Tensor, config: PostprocessConfig) -> None:
        super().__init__()
        check_exportable_config(config)
        self.register_buffer("anchors", anchors.detach().float().clone(), persistent=False)
        self.config = config

    def forward(
        self, locs: Tensor, logits: Tensor, image_sizes: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _as_tuple(postprocess(locs, logits, self.anchors, image_sizes, self.config))


class DetectorModule(nn.Module):
    """Images [B, 3, H, W] (resized, normalised) -> padded detections of a SingleStageDetector."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        check_detector(detector)
        self.detector = detector
        self.config = detector.postprocess_config
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
        return _as_tuple(postprocess(locs, logits, self.anchors, sizes, self.config))


def check_exportable_config(config: PostprocessConfig) -> None:
    """Raises ValueError for a postprocess the exporters do not cover: they lower
    SSD's one fused op (``config.uses_fused_per_class_op``); the rest of the family
    (per-level and per-image selection, score factors, single labels, class-agnostic
    NMS, an allow-list, decoded boxes) runs select_topk and batched_nms_padded,
    which have no ONNX or AOTInductor lowering yet."""
    if not config.uses_fused_per_class_op:
        raise ValueError(
            "export covers SSD's fused per-class op (selection='per_class', softmax or "
            "sigmoid, box coder 'box', no score factor, multi-label, per-class NMS, no "
            f"classes allow-list); this config (selection={config.selection!r}, "
            f"score_activation={config.score_activation!r}, "
            f"score_factor_mode={config.score_factor_mode!r}, label_mode={config.label_mode!r}, "
            f"class_agnostic={config.class_agnostic}, box_coder={config.box_coder!r}) "
            "cannot be exported yet"
        )


def check_detector(model: Any) -> None:
    """Raises TypeError unless ``model`` is a SingleStageDetector-like module (models/ of
    the repository) postprocessed by ssd_post."""
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
    check_exportable_config(model.postprocess_config)
