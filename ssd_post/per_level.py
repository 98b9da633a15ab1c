"""Per-level selection of RetinaNet and FCOS, batched over images.

torchvision's ``RetinaNet`` / ``FCOS.postprocess_detections`` loop over images and
feature levels; here the threshold, the per-(image, level) top-k, the decode and the
NMS run once for the whole batch, with the same bits:

- the selection is the compiled op ``ssd_post::select_topk`` on the CPU and on
  CUDA: for every (image, level) block, the scores, the threshold and the
  ``topk_candidates`` highest scores over all anchor x class pairs, equal scores by
  flattened index (anchor * C + class). On the CPU its scores are torch's own
  sigmoid bits on exactly the blocks torchvision scores (torch's CPU sigmoid rounds
  the vectorised body of its loop and the scalar tail differently, see
  csrc/cpu/select_per_level.cpp, which checks itself and falls back to scoring
  blocks whole); on CUDA they come from the device's expf, as torchvision's CUDA
  sigmoid;
- NMS is ssd_post's batched NMS with key = image * C + class.

Decode, NMS and the per-image top-k are batched torch ops and ``batched_nms``; on
CUDA they wait for the device where a candidate count sets a size.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .box_coder import BoxCoder, clip_boxes
from .config import PostprocessConfig
from .formats import Detections
from .linear_coder import LinearBoxCoder
from . import ops
from .ops import batched_nms


def select_per_level(
    logits: Tensor, centerness: Optional[Tensor], config: PostprocessConfig, level_sizes: List[int]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores, threshold and per-(image, level) top-k over anchor x class pairs, by the
    compiled op ``ssd_post::select_topk`` on every device.

    Args:
        logits (Tensor[B, A, C]), centerness (Tensor[B, A, 1] or None).

    Returns:
        image, anchor, label (Tensor[N] int64) and score (Tensor[N] float32) of the
        candidates, grouped by (image, level), each group by decreasing score (equal
        scores by flattened index anchor * C + class), at most ``topk_candidates``
        per group. ``reference.select_per_level_loop`` is the oracle.
    """
    return select_with_kernel(ops.select_topk_op, logits, centerness, config, level_sizes)


def select_with_kernel(
    select_op,
    logits: Tensor,
    centerness: Optional[Tensor],
    config: PostprocessConfig,
    level_sizes: List[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`select_per_level` through a per-level selection op with the signature
    of ``ops.select_topk_op`` (the compiled op, or the tests' CUDA emulator):
    the same candidates in the same order on every device; scores are torch's CPU
    sigmoid bits on the CPU, the device's expf on CUDA.

    The kernel writes each (image, level)'s ranked pairs into fixed slots [B, L, k];
    the valid ones are read out in (image, level, rank) order.
    """
    batch, _, num_classes = logits.shape
    flat, score, counts = select_op(
        logits,
        centerness,
        level_sizes,
        config.score_thresh,
        config.topk_candidates,
        config.resolve_background_class(num_classes),
    )
    valid = torch.arange(flat.shape[-1], device=flat.device) < counts[..., None]  # [B, L, k]
    image = torch.arange(batch, device=flat.device)[:, None, None].expand_as(flat)[valid]
    flat, score = flat[valid], score[valid]
    return image, torch.div(flat, num_classes, rounding_mode="floor"), flat % num_classes, score


def decode_boxes(locs: Tensor, anchors: Tensor, config: PostprocessConfig) -> Tensor:
    """xyxy float32 boxes (Tensor[N, 4]) from regressions and anchors (Tensor[N, 4])."""
    coder = LinearBoxCoder() if config.box_coder == "linear" else BoxCoder(config.box_weights)
    return coder.decode(locs, anchors)


def pad_per_image(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    image: Tensor,
    keep: Tensor,
    batch: int,
    detections_per_img: int,
) -> Detections:
    """The first ``detections_per_img`` of ``keep`` (indices by decreasing score) of
    each image, zero-padded into Detections [B, K]."""
    keep = keep[torch.sort(image[keep], stable=True).indices]  # by image, score order kept
    kept_image = image[keep]
    counts = torch.bincount(kept_image, minlength=batch)
    rank = torch.arange(keep.numel(), device=keep.device) - (counts.cumsum(0) - counts)[kept_image]
    inside = rank < detections_per_img
    keep, kept_image, rank = keep[inside], kept_image[inside], rank[inside]
    out = Detections(
        boxes=boxes.new_zeros((batch, detections_per_img, 4)),
        scores=scores.new_zeros((batch, detections_per_img)),
        labels=labels.new_zeros((batch, detections_per_img)),
        num_detections=counts.clamp(max=detections_per_img),
    )
    out.boxes[kept_image, rank] = boxes[keep]
    out.scores[kept_image, rank] = scores[keep]
    out.labels[kept_image, rank] = labels[keep]
    return out


def postprocess_per_level(
    locs: Tensor,
    logits: Tensor,
    anchors: Tensor,
    image_sizes: Tensor,
    config: PostprocessConfig,
    level_sizes: List[int],
    centerness: Optional[Tensor],
) -> Detections:
    """RetinaNet / FCOS postprocess of a batch (inputs already checked and normalised).

    Args:
        locs (Tensor[B, A, 4]), logits (Tensor[B, A, C]), anchors (Tensor[A, 4] or
        Tensor[B, A, 4] float32), image_sizes (Tensor[B, 2] (h, w)), level_sizes
        (anchors per level, summing to A), centerness (Tensor[B, A, 1] or None).
    """
    batch, num_anchors, num_classes = logits.shape
    image, anchor, label, score = select_per_level(logits, centerness, config, level_sizes)
    box_anchors = anchors[anchor] if anchors.dim() == 2 else anchors[image, anchor]
    boxes = decode_boxes(locs[image, anchor], box_anchors, config)
    if config.clip_boxes:
        hw = image_sizes[image].to(torch.float32)
        boxes = clip_boxes(boxes, (hw[:, 0:1], hw[:, 1:2]))
    padded = config.padded_detections(num_anchors, num_classes)
    # Only the first `padded` survivors of an image are kept: NMS stops each image
    # there (the full NMS truncated, the same answer with less work).
    keep = batched_nms(
        boxes,
        score,
        image * num_classes + label,
        config.nms_thresh,
        max_kept=padded,
        keys_per_image=num_classes,
    )
    return pad_per_image(boxes, score, label, image, keep, batch, padded)
