"""Per-level selection of RetinaNet and FCOS, batched over images.

torchvision's ``RetinaNet`` / ``FCOS.postprocess_detections`` loop over images and
feature levels; here the threshold, the per-(image, level) top-k, the decode and the
NMS run once for the whole batch, with the same bits:

- scores come from torch's own sigmoid / mul / sqrt on exactly the (image, level)
  blocks torchvision computes them on: torch's CPU sigmoid rounds the vectorised
  body of a loop and its scalar tail differently, so the bits of a score depend on
  where it sits in the block it was computed in (a whole-batch sigmoid differs);
  a sparse block computes only the pairs above a logit bound, with those bits
  reproduced by ``block_sigmoid``;
- the top-k keeps, per (image, level), the ``topk_candidates`` highest scores over
  all anchor x class pairs, equal scores by flattened index (anchor * C + class);
- NMS is ssd_post's batched NMS with key = image * C + class.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .block_sigmoid import loop_step, sigmoid_at
from .box_coder import BoxCoder, clip_boxes
from .config import PostprocessConfig
from .formats import Detections
from .linear_coder import LinearBoxCoder
from .ops import batched_nms

LevelSizes = Union[Sequence[int], Tensor]


def check_level_sizes(level_sizes: Optional[LevelSizes], num_anchors: int) -> List[int]:
    """Anchors per feature level as a list of ints summing to ``num_anchors`` (A)."""
    if level_sizes is None:
        raise ValueError("level_sizes should be given (anchors per feature level) for selection='per_level', got None")
    if isinstance(level_sizes, Tensor):
        if level_sizes.dim() != 1 or level_sizes.is_floating_point():
            raise ValueError(f"level_sizes should be a 1d integer tensor, got {level_sizes.dim()}D {level_sizes.dtype}")
        level_sizes = level_sizes.tolist()
    try:
        sizes = [int(n) for n in level_sizes]
    except (TypeError, ValueError) as err:
        raise ValueError(f"level_sizes should be a list of ints, got {level_sizes!r}") from err
    if not sizes or any(n < 0 for n in sizes) or sum(sizes) != num_anchors:
        raise ValueError(f"level_sizes should be ints >= 0 summing to A = {num_anchors}, got {sizes}")
    return sizes


def check_centerness(centerness: Optional[Tensor], activation: str, batch: int, num_anchors: int) -> Optional[Tensor]:
    """Centerness logits as Tensor[B, A, 1], or None when the activation has none."""
    if activation != "sigmoid_centerness":
        if centerness is not None:
            raise ValueError(f"centerness is only used by score_activation='sigmoid_centerness', got {activation!r}")
        return None
    if not isinstance(centerness, Tensor):
        raise ValueError(f"centerness should be a Tensor [B, A] or [B, A, 1], got {type(centerness).__name__}")
    if not centerness.is_floating_point():
        raise ValueError(f"centerness should be a floating point tensor, got {centerness.dtype}")
    if tuple(centerness.shape) not in ((batch, num_anchors), (batch, num_anchors, 1)):
        raise ValueError(f"centerness should be [B, A] or [B, A, 1] = [{batch}, {num_anchors}(, 1)], "
                         f"got {tuple(centerness.shape)}")
    return centerness.reshape(batch, num_anchors, 1)


def block_scores(logits: Tensor, activation: str, centerness: Optional[Tensor]) -> Tensor:
    """Scores (Tensor[A_l, C] float32) of one (image, level) block: torch's own kernels
    on exactly the block torchvision computes them on (see the module docstring)."""
    if activation == "sigmoid_centerness":
        return torch.sqrt(torch.sigmoid(logits.float()) * torch.sigmoid(centerness.float()))
    return torch.sigmoid(logits.float())


def logit_bound(activation: str, score_thresh: float) -> float:
    """A logit at or below which no score of ``activation`` can pass ``score_thresh``
    (for sigmoid_centerness it bounds the class and the centerness logit alike, as
    both sigmoids are <= 1); -inf when no useful bound exists.

    sigmoid(x) > t needs x > logit(t); sqrt(s * c) > t needs s * c > t^2 up to
    rounding, so s > t^2 (1 - 1e-3). The 0.01 margin in logit space (a 1% change
    of the score) covers torch's sigmoid rounding by far."""
    p = score_thresh if activation == "sigmoid" else score_thresh * score_thresh * (1 - 1e-3)
    if p < 1e-30:  # tiny or subnormal thresholds: the relative rounding bound fails
        return float("-inf")
    if p >= 1.0:
        return float("inf")
    return math.log(p) - math.log1p(-p) - 0.01


def _block_candidates(logits: Tensor, centerness: Optional[Tensor], config: PostprocessConfig,
                      background: Optional[int], step: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Flat positions (anchor * C + class, Tensor[N] int64, increasing) and scores
    (Tensor[N] float32) of one (image, level) block that pass the threshold."""
    bound = logit_bound(config.score_activation, config.score_thresh)
    if (step is not None and bound > float("-inf") and logits.dtype == torch.float32
            and logits.is_contiguous() and (centerness is None or centerness.is_contiguous())):
        # Only the logits above the bound go through the sigmoid, when they are few
        # (gathering pays off for a trained head, not for a dense one). One max per
        # anchor first: comparing and scanning all A_l x C logits costs more than
        # that read. "not <=" keeps rows whose max is NaN (another class may pass).
        rows = ~(logits.amax(dim=1) <= bound)
        if centerness is not None:
            rows &= centerness[:, 0].float() > bound
        rows = rows.nonzero().flatten()
        passing = logits[rows] > bound
        if background is not None:
            passing[:, background] = False
        row, column = passing.nonzero(as_tuple=True)
        flat = rows[row] * logits.shape[1] + column  # row-major order: increasing
        if flat.numel() * 8 <= logits.numel():
            score = sigmoid_at(logits, flat, step)
            if centerness is not None:
                anchor = torch.div(flat, logits.shape[1], rounding_mode="floor")
                score = torch.sqrt(score * sigmoid_at(centerness.float(), anchor, step))
            keep = score > config.score_thresh
            return flat[keep], score[keep]
    score = block_scores(logits, config.score_activation, centerness)
    passing = score > config.score_thresh
    if background is not None:
        passing[:, background] = False
    flat = passing.flatten().nonzero().flatten()
    return flat, score.flatten()[flat]


def _level_slices(level_sizes: List[int]) -> List[slice]:
    ends = torch.tensor(level_sizes).cumsum(0).tolist()
    return [slice(end - size, end) for size, end in zip(level_sizes, ends)]


def select_per_level(logits: Tensor, centerness: Optional[Tensor], config: PostprocessConfig,
                     level_sizes: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores, threshold and per-(image, level) top-k over anchor x class pairs.

    Args:
        logits (Tensor[B, A, C]), centerness (Tensor[B, A, 1] or None).

    Returns:
        image, anchor, label (Tensor[N] int64) and score (Tensor[N] float32) of the
        candidates, grouped by (image, level), each group by decreasing score (equal
        scores by flattened index anchor * C + class), at most ``topk_candidates``
        per group.
    """
    batch, _, num_classes = logits.shape
    background = config.resolve_background_class(num_classes)
    step = loop_step() if logits.device.type == "cpu" else None
    images, flats, scores = [], [], []
    # One (image, level) block at a time, as torchvision: the score bits depend on
    # the block, and a block's candidates are cut to about k before any sort.
    for image in range(batch):
        for block in _level_slices(level_sizes):
            block_centerness = None if centerness is None else centerness[image, block]
            flat, score = _block_candidates(logits[image, block], block_centerness, config, background, step)
            if flat.numel() > config.topk_candidates:
                # Ties with the k-th score all stay: the rank cut below picks among
                # them by flattened index.
                keep = score >= score.topk(config.topk_candidates, sorted=False).values.min()
                flat, score = flat[keep], score[keep]
            images.append(torch.full_like(flat, image))
            flats.append(flat + block.start * num_classes)
            scores.append(score)
    if not scores:
        empty = logits.new_zeros((0,), dtype=torch.int64)
        return empty, empty, empty, logits.new_zeros((0,), dtype=torch.float32)
    image, flat, score = torch.cat(images), torch.cat(flats), torch.cat(scores)
    anchor = torch.div(flat, num_classes, rounding_mode="floor")
    level_ends = torch.tensor(level_sizes, device=logits.device).cumsum(0)
    group = image * len(level_sizes) + torch.bucketize(anchor, level_ends, right=True)
    # Two stable sorts: by score inside each group, equal scores keep flattened order.
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    group = group[order]
    counts = torch.bincount(group, minlength=batch * len(level_sizes))
    starts = counts.cumsum(0) - counts
    rank = torch.arange(group.numel(), device=logits.device) - starts[group]
    order = order[rank < config.topk_candidates]
    return image[order], anchor[order], flat[order] % num_classes, score[order]


def decode_boxes(locs: Tensor, anchors: Tensor, config: PostprocessConfig) -> Tensor:
    """xyxy float32 boxes (Tensor[N, 4]) from regressions and anchors (Tensor[N, 4])."""
    coder = LinearBoxCoder() if config.box_coder == "linear" else BoxCoder(config.box_weights)
    return coder.decode(locs, anchors)


def pad_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, image: Tensor, keep: Tensor,
                  batch: int, detections_per_img: int) -> Detections:
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


def postprocess_per_level(locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor,
                          config: PostprocessConfig, level_sizes: List[int],
                          centerness: Optional[Tensor]) -> Detections:
    """RetinaNet / FCOS postprocess of a batch (inputs already checked and normalised).

    Args:
        locs (Tensor[B, A, 4]), logits (Tensor[B, A, C]), anchors (Tensor[A, 4] or
        Tensor[B, A, 4] float32), image_sizes (Tensor[B, 2] (h, w)), level_sizes
        (anchors per level, summing to A), centerness (Tensor[B, A, 1] or None).
    """
    batch, num_anchors, num_classes = logits.shape
    if locs.device.type != "cpu":
        raise NotImplementedError(f"selection='per_level' is not implemented on CUDA yet, got {locs.device}")
    image, anchor, label, score = select_per_level(logits, centerness, config, level_sizes)
    box_anchors = anchors[anchor] if anchors.dim() == 2 else anchors[image, anchor]
    boxes = decode_boxes(locs[image, anchor], box_anchors, config)
    if config.clip_boxes:
        hw = image_sizes[image].to(torch.float32)
        boxes = clip_boxes(boxes, (hw[:, 0:1], hw[:, 1:2]))
    keep = batched_nms(boxes, score, image * num_classes + label, config.nms_thresh)
    return pad_per_image(boxes, score, label, image, keep, batch,
                         config.padded_detections(num_anchors, num_classes))
