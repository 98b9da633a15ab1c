"""Thin Python entry points to the compiled ops, and their fake kernels.

Importing this module loads ``ssd_post._C``, whose static initialisers register the
schemas and the CPU (and, when built with nvcc, CUDA) kernels under
``torch.ops.ssd_post``. The fake kernels below give torch.compile / torch.export the
output shapes without running anything.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the kernels)

__all__ = ["decode_threshold_flatten_op", "batched_nms", "postprocess_op", "has_cuda_kernels"]


def has_cuda_kernels() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("ssd_post::postprocess", "CUDA")


@torch.library.register_fake("ssd_post::decode_threshold_flatten")
def _decode_threshold_flatten_fake(locs, logits, anchors, image_sizes, score_thresh,
                                   topk_candidates, box_weights, score_activation,
                                   background_class, clip_boxes):
    torch._check(locs.dim() == 3 and logits.dim() == 3, lambda: "locs and logits should be 3d")
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        locs.new_empty((n, 4), dtype=torch.float32),
        locs.new_empty((n,), dtype=torch.float32),
        locs.new_empty((n,), dtype=torch.int64),
    )


@torch.library.register_fake("ssd_post::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "boxes should be [N, 4]")
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


@torch.library.register_fake("ssd_post::postprocess")
def _postprocess_fake(locs, logits, anchors, image_sizes, score_thresh, nms_thresh,
                      topk_candidates, detections_per_img, box_weights, score_activation,
                      background_class, clip_boxes):
    torch._check(logits.dim() == 3, lambda: "logits should be [B, A, C]")
    batch, k = logits.shape[0], detections_per_img
    return (
        locs.new_empty((batch, k, 4), dtype=torch.float32),
        locs.new_empty((batch, k), dtype=torch.float32),
        locs.new_empty((batch, k), dtype=torch.int64),
        locs.new_empty((batch,), dtype=torch.int64),
    )


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS applied independently inside each group of equal ``idxs``.

    Same contract as ``torchvision.ops.batched_nms``, computed per group (no
    coordinate-offset trick, so any idx values and coordinates are exact).

    Args:
        boxes (Tensor[N, 4]): xyxy boxes, floating point (computed in float32).
        scores (Tensor[N]): scores; NaN ranks above every number, as in ``torch.sort``.
        idxs (Tensor[N]): integer group of each box (e.g. image * C + class).
        iou_threshold (float): in [0, 1]; a box whose IoU with a kept box of its group
            is ``> iou_threshold`` is dropped. Zero-area boxes suppress nothing.

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score, equal scores
        in increasing index order.
    """
    return torch.ops.ssd_post.batched_nms(boxes, scores, idxs, float(iou_threshold))


def decode_threshold_flatten_op(locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor,
                                score_thresh: float, topk_candidates: int,
                                box_weights: List[float], score_activation: str,
                                background_class: Optional[int],
                                clip_boxes: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.decode_threshold_flatten`` (tensors already normalised)."""
    return torch.ops.ssd_post.decode_threshold_flatten(
        locs, logits, anchors, image_sizes, float(score_thresh), int(topk_candidates),
        [float(w) for w in box_weights], score_activation, background_class, bool(clip_boxes))


def postprocess_op(locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor,
                   score_thresh: float, nms_thresh: float, topk_candidates: int,
                   detections_per_img: int, box_weights: List[float], score_activation: str,
                   background_class: Optional[int],
                   clip_boxes: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.postprocess`` (tensors already normalised)."""
    return torch.ops.ssd_post.postprocess(
        locs, logits, anchors, image_sizes, float(score_thresh), float(nms_thresh),
        int(topk_candidates), int(detections_per_img), [float(w) for w in box_weights],
        score_activation, background_class, bool(clip_boxes))
