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

On CUDA the selection is one kernel launch for all (image, level) blocks
(``ssd_post::select_per_level``: threshold and an exact radix top-k per block, the
same ranking), with scores from the device's expf, as torchvision's CUDA sigmoid;
decode, NMS and the per-image top-k are batched torch ops and ``batched_nms``,
which wait for the device where a candidate count sets a size. Without the CUDA
build the torch ops below run on the device, each block's scores computed whole.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .block_sigmoid import loop_step, sigmoid_gathered, tail_mask
from .box_coder import BoxCoder, clip_boxes
from .config import PostprocessConfig
from .formats import Detections
from .linear_coder import LinearBoxCoder
from . import ops
from .ops import batched_nms


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


def _dense_block_candidates(
    logits: Tensor,
    centerness: Optional[Tensor],
    config: PostprocessConfig,
    background: Optional[int],
) -> Tuple[Tensor, Tensor]:
    """Flat positions (anchor * C + class, Tensor[N] int64, increasing) and scores
    (Tensor[N] float32) of one (image, level) block that pass the threshold, from
    the whole block's scores."""
    score = block_scores(logits, config.score_activation, centerness).flatten()
    passing = score > config.score_thresh
    if background is not None:
        passing.view(-1, logits.shape[-1])[:, background] = False
    k = config.topk_candidates
    if passing.numel() > k:
        # Most of a dense block passes: cut at the k-th passing score before listing
        # the positions (listing millions of them cost more than the top-k). Ties
        # with the k-th score all stay, as in _cut_to_topk.
        kth = torch.where(passing, score, float("-inf")).topk(k, sorted=False).values.min()
        if kth > float("-inf"):
            passing &= score >= kth
    flat = passing.nonzero().flatten()
    return flat, score[flat]


def _topk_logit_bounds(
    row_max: Tensor,
    centerness: Optional[Tensor],
    bound: float,
    config: PostprocessConfig,
    background: Optional[int],
) -> Tensor:
    """Per anchor (Tensor[B, A_l] float32), a class logit at or below which a pair
    can neither pass the threshold nor be among its (image, level)'s
    ``topk_candidates`` best scores.

    The k anchors with the best score of their best class give k pairs scoring at
    least about s_k, the k-th best of those anchor scores; a pair of the top k
    scores at least that much. With plain sigmoid, s = sigmoid(x); with centerness
    (FCOS), s = sqrt(sigmoid(x) * sigmoid(ctr)), which needs sigmoid(x) >= s_k^2 /
    sigmoid(ctr). s_k is lowered by a relative 1e-5, far more than the ulps by which
    torch's float score differs from the exact one (its vectorised and scalar
    sigmoids differ too), so pairs tied with the k-th score are never cut: sigmoid
    saturates at exactly 1.0 from about x = 17, so such ties can have far lower
    logits than the k-th anchor's. A dense head's block then costs one max per
    anchor instead of a sigmoid per pair. No such bound is used with a background
    column, whose logit is in the max.
    """
    batch, level_anchors = row_max.shape
    k = config.topk_candidates
    out = torch.full((batch, level_anchors), bound, dtype=torch.float32)
    if background is not None or level_anchors <= k or batch == 0:
        return out
    if not bool(((row_max > bound).sum(dim=1) > k).any()):
        return out  # no image has more than k anchors that may pass: nothing to cut
    best = torch.sigmoid(row_max.double())
    if centerness is not None:
        ctr = torch.sigmoid(centerness[..., 0].double())
        best = torch.sqrt(best * ctr)
    # A NaN score does not count: its anchor may hold no valid pair at all.
    kth = torch.nan_to_num(best, nan=-1.0).topk(k, dim=1).values[:, -1:].clamp(min=0.0)  # [B, 1]
    needed = kth * (1 - 1e-5)  # the sigmoid a pair's class logit must reach
    if centerness is not None:
        # s^2 / sigmoid(ctr), past 1 (no pair of the anchor can reach it) kept as 1: logit inf.
        needed = torch.where(ctr > 0, (needed * needed / ctr).clamp(max=1.0), torch.ones_like(ctr))
    logit_needed = (torch.log(needed) - torch.log1p(-needed)).float()  # 0: -inf, no pruning
    return torch.maximum(out, logit_needed)


def _level_candidates(
    logits: Tensor,
    centerness: Optional[Tensor],
    config: PostprocessConfig,
    background: Optional[int],
    step: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """The (image, level) blocks of one level that pass the threshold, all images at once.

    Args:
        logits (Tensor[B, A_l, C]), centerness (Tensor[B, A_l, 1] or None): the level.

    Returns:
        image, flat position in the image's block (anchor * C + class), both
        Tensor[N] int64, and score (Tensor[N] float32); by image, then by flat.
    """
    batch, level_anchors, num_classes = logits.shape
    bound = logit_bound(config.score_activation, config.score_thresh)
    # The loop layout that block_sigmoid reproduces is that of a contiguous block.
    blocks_contiguous = batch == 0 or (
        logits[0].is_contiguous() and (centerness is None or centerness[0].is_contiguous())
    )
    gather = (
        step is not None
        and bound > float("-inf")
        and logits.dtype == torch.float32
        and blocks_contiguous
    )
    if gather:
        # Only the logits above the bound go through the sigmoid, when they are few
        # (gathering pays off for a trained head, not for a dense one). One max per
        # anchor first: comparing and scanning all A_l x C logits costs more than
        # that read. "not <=" keeps rows whose max is NaN (another class may pass).
        row_max = logits.amax(dim=2)  # [B, A_l]
        anchor_bound = _topk_logit_bounds(
            row_max, centerness, bound, config, background
        )  # [B, A_l]
        rows = ~(row_max <= anchor_bound)
        if centerness is not None:
            rows &= centerness[..., 0].float() > bound
        row_image, row_anchor = rows.nonzero(as_tuple=True)
    if gather and row_image.numel() * 2 > rows.numel():
        gather = False  # most anchors may pass: the whole-block path is cheaper
    if gather:
        passing = logits[row_image, row_anchor] > anchor_bound[row_image, row_anchor][:, None]
        if background is not None:
            passing[:, background] = False
        row, column = passing.nonzero(as_tuple=True)
        image = row_image[row]
        anchor = row_anchor[row]
        flat = anchor * num_classes + column  # row-major order: increasing per image
        if flat.numel() * 8 <= logits.numel():
            # Every block of the level has the same size, hence the same loop layout.
            block_numel = level_anchors * num_classes
            score = sigmoid_gathered(
                logits[image, anchor, column], tail_mask(block_numel, flat, step), step
            )
            if centerness is not None:
                ctr = centerness[image, anchor, 0].float()
                score = torch.sqrt(
                    score * sigmoid_gathered(ctr, tail_mask(level_anchors, anchor, step), step)
                )
            keep = score > config.score_thresh
            return image[keep], flat[keep], score[keep]
    empty = logits.new_zeros((0,), dtype=torch.int64)
    images, flats, scores = [empty], [empty], [logits.new_zeros((0,), dtype=torch.float32)]
    for b in range(batch):
        flat, score = _dense_block_candidates(
            logits[b], None if centerness is None else centerness[b], config, background
        )
        images.append(torch.full_like(flat, b))
        flats.append(flat)
        scores.append(score)
    return torch.cat(images), torch.cat(flats), torch.cat(scores)


def _cut_to_topk(image: Tensor, score: Tensor, batch: int, k: int) -> Tensor:
    """Which candidates of one level can still be in their image's top k (Tensor[N]
    bool): in an image with more than k, those at or above its k-th score. Ties
    with the k-th score all stay: the rank cut after the sort picks among them by
    flattened index."""
    keep = torch.ones_like(image, dtype=torch.bool)
    counts = torch.bincount(image, minlength=batch)
    for b in (counts > k).nonzero().flatten().tolist():
        mine = (image == b).nonzero().flatten()
        keep[mine] = score[mine] >= score[mine].topk(k, sorted=False).values.min()
    return keep


def _level_slices(level_sizes: List[int]) -> List[slice]:
    ends = torch.tensor(level_sizes).cumsum(0).tolist()
    return [slice(end - size, end) for size, end in zip(level_sizes, ends)]


def select_per_level(
    logits: Tensor, centerness: Optional[Tensor], config: PostprocessConfig, level_sizes: List[int]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scores, threshold and per-(image, level) top-k over anchor x class pairs.

    Args:
        logits (Tensor[B, A, C]), centerness (Tensor[B, A, 1] or None).

    Returns:
        image, anchor, label (Tensor[N] int64) and score (Tensor[N] float32) of the
        candidates, grouped by (image, level), each group by decreasing score (equal
        scores by flattened index anchor * C + class), at most ``topk_candidates``
        per group.
    """
    if logits.device.type == "cuda" and ops.has_cuda_kernels():
        return select_with_kernel(ops.select_per_level_op, logits, centerness, config, level_sizes)
    batch, _, num_classes = logits.shape
    background = config.resolve_background_class(num_classes)
    step = loop_step() if logits.device.type == "cpu" else None
    images, flats, scores = [], [], []
    # One level at a time for all images: the score bits depend on the (image, level)
    # block torchvision computes them on (all blocks of a level have one size), and
    # a block's candidates are cut to about k before any sort.
    for block in _level_slices(level_sizes):
        level_centerness = None if centerness is None else centerness[:, block]
        image, flat, score = _level_candidates(
            logits[:, block], level_centerness, config, background, step
        )
        keep = _cut_to_topk(image, score, batch, config.topk_candidates)
        images.append(image[keep])
        flats.append(flat[keep] + block.start * num_classes)
        scores.append(score[keep])
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


def select_with_kernel(
    select_op,
    logits: Tensor,
    centerness: Optional[Tensor],
    config: PostprocessConfig,
    level_sizes: List[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`select_per_level` through the compiled per-level selection (the CUDA
    kernel; ``select_op`` has the signature of ``ops.select_per_level_op``): the
    same candidates in the same order, scores from the device's expf.

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
    keep = batched_nms(boxes, score, image * num_classes + label, config.nms_thresh)
    return pad_per_image(
        boxes, score, label, image, keep, batch, config.padded_detections(num_anchors, num_classes)
    )
