"""The postprocess of the single-stage family, for every config that SSD's fused
per-class op does not serve (``PostprocessConfig.uses_fused_per_class_op``).

Three stages, each fixed-size and free of host synchronisation on CUDA:

1. ``ssd_post::select_topk`` scores, thresholds and ranks the anchor x class pairs
   of every (image, group) (group: feature level, image or class), as [B, G, k]
   slots: torch's own score bits on the CPU (csrc/cpu/select_per_level.cpp), the
   device's on CUDA.
2. The boxes of the selected anchors are gathered and decoded with torchvision's
   formulas, so the bits are theirs (``"box"``: the op ``decode_boxes``, ATen calls
   in torchvision's order; ``"linear"``: torch ops), or taken as given
   (``box_coder="none"``, xyxy or cxcywh), then clipped.
3. ``ssd_post::batched_nms_padded`` runs the greedy NMS of every image at once
   (per class, or per image when class-agnostic) and keeps each image's best
   ``padded_detections`` survivors.

The oracle is ``reference.postprocess_loop``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .box_coder import clip_boxes
from .config import PostprocessConfig
from .formats import Detections
from .linear_coder import LinearBoxCoder


def select_candidates(
    logits: Tensor,
    score_factor: Optional[Tensor],
    config: PostprocessConfig,
    level_sizes: List[int],
    select_op=ops.select_topk_op,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Stage 1: ``select_op`` (the compiled op, or the tests' CUDA emulator) with the
    arguments ``config`` gives it.

    Args:
        logits (Tensor[B, A, C]), score_factor (Tensor[B, A, 1] or None),
        level_sizes: anchors per level ([A] for per_image and per_class).

    Returns:
        flat (Tensor[B, G, k] int64, anchor * C + class, -1 past the count),
        scores (Tensor[B, G, k] float32) and counts (Tensor[B, G] int64).
    """
    return select_op(
        logits,
        score_factor,
        level_sizes,
        *config.select_topk_arguments(logits.shape[2]),
    )


def flatten_slots(
    flat: Tensor, scores: Tensor, num_classes: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The filled slots of select_topk's flat and scores ([B, G, k]) as flat
    candidate lists in (image, group, rank) order.

    Returns:
        image, anchor, label (Tensor[N] int64) and score (Tensor[N] float32).
    """
    valid = flat >= 0  # select_topk writes -1 past each group's count
    image = torch.arange(flat.shape[0], device=flat.device)[:, None, None].expand_as(flat)[valid]
    flat, scores = flat[valid], scores[valid]
    return image, torch.div(flat, num_classes, rounding_mode="floor"), flat % num_classes, scores


def select_flat(
    logits: Tensor,
    score_factor: Optional[Tensor],
    config: PostprocessConfig,
    level_sizes: List[int],
    select_op=ops.select_topk_op,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage 1 as flat candidate lists (image, anchor, label, score: Tensor[N] each,
    by image, group, rank): for tests and debugging; ``reference.select_flat_loop``
    is its oracle."""
    flat, scores, _ = select_candidates(logits, score_factor, config, level_sizes, select_op)
    return flatten_slots(flat, scores, logits.shape[2])


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2) in the input's dtype, half sides first.

    Args:
        boxes (Tensor[..., 4]): centre, width, height.

    Returns:
        Tensor[..., 4]: corners.
    """
    centre, half = boxes[..., :2], boxes[..., 2:4] / 2
    return torch.cat((centre - half, centre + half), dim=-1)


def decode_selected(
    locs: Tensor, anchors: Optional[Tensor], anchor: Tensor, config: PostprocessConfig
) -> Tensor:
    """Stage 2 before clipping: float32 xyxy boxes (Tensor[B, M, 4]) of the anchors
    ``anchor`` (Tensor[B, M] int64, rows of ``locs``) of each image.

    Args:
        locs (Tensor[B, A, 4]): regressions, or boxes with ``box_coder="none"``.
        anchors (Tensor[A, 4] or Tensor[B, A, 4] float32, or None with "none").
    """
    rows = anchor[..., None].expand(-1, -1, 4)
    if locs.stride(1) < locs.stride(2) and not torch.compiler.is_compiling():
        # Anchors are the contiguous dimension (a view of YOLO's [B, 4 + nc, N]):
        # gathered along each coordinate's row, in one pass per row (about twice as
        # fast as striding across the four rows for each anchor). Not when exporting:
        # ONNX GatherElements (OpenVINO) needs an index as large as the data but the
        # gathered axis, which this gather's [B, 4, M] index into a slice is not.
        selected = locs.mT.gather(2, anchor[:, None, :].expand(-1, 4, -1)).mT
    else:
        selected = locs.gather(1, rows)
    if config.box_coder == "none":
        # Converted in the input's dtype first, as a torch user converting the
        # model's output would, then to float32 like every other decode.
        boxes = cxcywh_to_xyxy(selected) if config.box_format == "cxcywh" else selected
        return boxes.float()
    if anchors.dim() == 2:
        box_anchors = anchors[anchor]
    else:
        box_anchors = anchors.gather(1, rows)
    if config.box_coder == "linear":
        return LinearBoxCoder().decode(selected, box_anchors)
    # BoxCoder.decode's formula as one op (its oracle), so an exported program runs
    # eager's kernels rather than a recompiled formula: the same bits everywhere.
    return ops.decode_boxes(selected, box_anchors, config.box_weights)


def postprocess_family(
    locs: Tensor,
    logits: Tensor,
    anchors: Optional[Tensor],
    image_sizes: Optional[Tensor],
    config: PostprocessConfig,
    level_sizes: List[int],
    score_factor: Optional[Tensor],
    select_op=ops.select_topk_op,
) -> Detections:
    """Detections of a batch for any config (inputs already checked and normalised).

    Args:
        locs (Tensor[B, A, 4]), logits (Tensor[B, A, C]), anchors (Tensor[A, 4] or
        Tensor[B, A, 4] float32, None with ``box_coder="none"``), image_sizes
        (Tensor[B, 2] (h, w) on the device of locs, None when not clipping),
        level_sizes (anchors per level summing to A; [A] for per_image and
        per_class), score_factor (Tensor[B, A, 1] or None).

    Returns:
        Detections [B, K] with anchor_indices, K = ``config.padded_detections(A, C)``.
    """
    batch, num_anchors, num_classes = logits.shape
    flat, scores, counts = select_candidates(logits, score_factor, config, level_sizes, select_op)
    anchor, labels, scores = candidate_slots(flat, scores, counts, num_classes)
    padded = config.padded_detections(num_anchors, num_classes)
    boxes, kept, counts = nms_slots(
        locs, anchors, image_sizes, config, anchor, labels, scores, padded
    )
    return gather_detections(boxes, scores, labels, anchor, kept, counts, padded)


def candidate_slots(
    flat: Tensor, scores: Tensor, counts: Tensor, num_classes: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """The select_topk slots [B, G, k] as one row of M = G * k slots per image.

    Returns:
        anchor (Tensor[B, M] int64, 0 in empty slots), labels (Tensor[B, M] int64, -1
        in empty slots) and scores (Tensor[B, M] float32).
    """
    batch = flat.shape[0]
    if flat.device.type == "cpu" and flat.numel() and not torch.compiler.is_compiling():
        # Past the fullest group's count every slot is empty: on the CPU in eager
        # mode they are dropped, sparing their decode and NMS (a trained model fills
        # a few of its topk_candidates slots). On CUDA (no host sync) and under
        # torch.compile (fixed shapes) every slot stays; the answer is the same.
        width = int(counts.max())
        flat, scores = flat[..., :width], scores[..., :width]
    slots = flat.shape[1] * flat.shape[2]
    flat, scores = flat.reshape(batch, slots), scores.reshape(batch, slots)
    valid = flat >= 0  # select_topk writes -1 past each group's count
    anchor = torch.where(valid, torch.div(flat, num_classes, rounding_mode="floor"), 0)
    labels = torch.where(valid, flat % num_classes, -1)
    return anchor, labels, scores


def nms_slots(
    locs: Tensor,
    anchors: Optional[Tensor],
    image_sizes: Optional[Tensor],
    config: PostprocessConfig,
    anchor: Tensor,
    labels: Tensor,
    scores: Tensor,
    padded: int,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Stages 2 and 3: the boxes of the candidate slots (anchor, labels, scores:
    Tensor[B, M], labels -1 in empty slots), clipped, then NMS per image (per class
    or class-agnostic) keeping each image's ``padded`` best survivors.

    Returns:
        boxes (Tensor[B, M, 4] float32), kept (Tensor[B, min(padded, M)] int64: the
        survivors' slots by decreasing score, -1 past the count) and counts
        (Tensor[B] int64).
    """
    boxes = decode_selected(locs, anchors, anchor, config)
    if config.clip_boxes:
        hw = image_sizes.to(torch.float32)[:, None, :]
        boxes = clip_boxes(boxes, (hw[..., 0:1], hw[..., 1:2]))
    kept, counts = suppress_slots(boxes, scores, labels, config, padded)
    return boxes, kept, counts


def suppress_slots(
    boxes: Tensor, scores: Tensor, labels: Tensor, config: PostprocessConfig, padded: int
) -> Tuple[Tensor, Tensor]:
    """Stage 3: NMS per image (per class, or class-agnostic) of the candidate slots
    (boxes Tensor[B, M, 4], scores and labels Tensor[B, M], labels -1 in empty
    slots), keeping each image's ``padded`` best survivors.

    Returns:
        kept (Tensor[B, min(padded, M)] int64: the survivors' slots by decreasing
        score, -1 past the count) and counts (Tensor[B] int64).
    """
    # padded is 0 when no column can be reported (A = 0, or only a background
    # column): the op needs max_kept >= 1, and no slot holds a candidate then.
    kept, counts = ops.batched_nms_padded(
        boxes, scores, labels, config.nms_thresh, max(padded, 1), config.class_agnostic
    )
    return kept[:, :padded], counts


def gather_detections(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    anchor: Tensor,
    kept: Tensor,
    counts: Tensor,
    padded: int,
) -> Detections:
    """Detections [B, padded] from the NMS survivors ``kept`` (Tensor[B, K'] slot
    indices, -1 past ``counts``) of the slots boxes [B, M, 4], scores, labels and
    anchor [B, M]: zeros (-1 for anchor_indices) in padding rows; K' <= padded
    columns are padded up to ``padded``."""
    inside = kept >= 0
    slot = kept.clamp(min=0)
    out_boxes = torch.where(
        inside[..., None], boxes.gather(1, slot[..., None].expand(-1, -1, 4)), 0
    )
    out_scores = torch.where(inside, scores.gather(1, slot), 0)
    out_labels = torch.where(inside, labels.gather(1, slot), 0)
    out_anchor = torch.where(inside, anchor.gather(1, slot), -1)
    missing = padded - kept.shape[1]
    if missing > 0:
        pad = torch.nn.functional.pad
        out_boxes = pad(out_boxes, (0, 0, 0, missing))
        out_scores = pad(out_scores, (0, missing))
        out_labels = pad(out_labels, (0, missing))
        out_anchor = pad(out_anchor, (0, missing), value=-1)
    return Detections(out_boxes, out_scores, out_labels, counts, out_anchor)
