"""Anchor matching and the SSD MultiBox loss, batched (no per-image loop).

Definitions follow the SSD paper and torchvision's ``SSD.compute_loss``:
an anchor is positive for the ground-truth box it overlaps most when that IoU is at
least ``iou_thresh``, and every ground-truth box also claims its best anchor (so
small objects always get one); the loss is smooth L1 (beta 1) on the encoded boxes
of positives plus cross-entropy on positives and on the 3x as many negatives with
the highest loss, both summed and divided by the number of positives of the batch.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from ssd_post import BoxCoder


def pad_targets(
    targets: Sequence[Dict[str, Tensor]], device: torch.device
) -> Tuple[Tensor, Tensor, Tensor]:
    """Stacks per-image boxes [n_i, 4] and labels [n_i] into [B, G, 4], [B, G], valid [B, G]."""
    batch = len(targets)
    most = max([int(t["boxes"].shape[0]) for t in targets] + [1])
    boxes = torch.zeros(batch, most, 4, device=device)
    labels = torch.zeros(batch, most, dtype=torch.int64, device=device)
    valid = torch.zeros(batch, most, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = int(t["boxes"].shape[0])
        boxes[i, :n] = t["boxes"].to(device=device, dtype=torch.float32)
        labels[i, :n] = t["labels"].to(device)
        valid[i, :n] = True
    return boxes, labels, valid


def match_anchors(anchors: Tensor, boxes: Tensor, valid: Tensor, iou_thresh: float = 0.5) -> Tensor:
    """Index of the matched box per anchor, -1 for background.

    Args:
        anchors (Tensor[A, 4]): xyxy.
        boxes (Tensor[B, G, 4]): xyxy ground truth, padded.
        valid (Tensor[B, G]): which boxes are real.

    Returns:
        Tensor[B, A] int64 in [-1, G).
    """
    batch, num_boxes = boxes.shape[:2]
    iou = box_iou(anchors, boxes.reshape(-1, 4))  # [A, B * G]
    iou = iou.reshape(-1, batch, num_boxes).permute(1, 0, 2)  # [B, A, G]
    iou = iou.masked_fill(~valid[:, None, :], -1.0)
    best_iou, matched = iou.max(dim=2)  # [B, A]
    matched = torch.where(best_iou >= iou_thresh, matched, torch.full_like(matched, -1))
    # Each real box claims its best anchor, even below the threshold.
    best_anchor = iou.argmax(dim=1)  # [B, G]
    rows = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand_as(best_anchor)
    cols = torch.arange(boxes.shape[1], device=boxes.device)[None, :].expand_as(best_anchor)
    matched[rows[valid], best_anchor[valid]] = cols[valid]
    return matched


def multibox_loss(
    locs: Tensor,
    logits: Tensor,
    anchors: Tensor,
    targets: Sequence[Dict[str, Tensor]],
    box_coder: BoxCoder,
    iou_thresh: float = 0.5,
    neg_pos_ratio: int = 3,
) -> Dict[str, Tensor]:
    """SSD loss of a batch.

    Args:
        locs (Tensor[B, A, 4]): predicted box regressions.
        logits (Tensor[B, A, C]): class logits, column 0 background.
        anchors (Tensor[A, 4]): xyxy default boxes in input pixels.
        targets: per image ``boxes`` (Tensor[n, 4] xyxy input pixels) and
            ``labels`` (Tensor[n] int64 in 1..C-1).
        box_coder: the coder whose ``encode`` gives the regression targets.

    Returns:
        ``{"bbox": smooth L1 term, "cls": cross-entropy term, "loss": their sum,
        "num_pos": positives in the batch}``.
    """
    anchors = anchors.to(locs.device)
    boxes, labels, valid = pad_targets(targets, locs.device)
    matched = match_anchors(anchors, boxes, valid, iou_thresh)  # [B, A]
    positive = matched >= 0
    safe = matched.clamp(min=0)
    cls_target = torch.where(
        positive, torch.gather(labels, 1, safe), torch.zeros_like(safe)
    )  # [B, A]
    num_pos = positive.sum()
    normaliser = num_pos.clamp(min=1).float()

    matched_boxes = torch.gather(boxes, 1, safe[..., None].expand(-1, -1, 4))  # [B, A, 4]
    batch_anchors = anchors[None].expand_as(matched_boxes)
    reg_target = box_coder.encode(matched_boxes[positive], batch_anchors[positive])
    bbox_loss = F.smooth_l1_loss(locs[positive].float(), reg_target, beta=1.0, reduction="sum")

    ce = F.cross_entropy(
        logits.float().flatten(0, 1), cls_target.flatten(), reduction="none"
    ).view_as(cls_target)
    # Hard negatives: the background anchors with the largest loss, 3 per positive per image.
    negative_ce = ce.detach().masked_fill(positive, float("-inf"))
    order = negative_ce.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    num_neg = (neg_pos_ratio * positive.sum(dim=1, keepdim=True)).clamp(max=ce.shape[1])
    negative = (rank < num_neg) & ~positive
    cls_loss = ce[positive].sum() + ce[negative].sum()
    bbox_term = bbox_loss / normaliser
    cls_term = cls_loss / normaliser
    return {"bbox": bbox_term, "cls": cls_term, "loss": bbox_term + cls_term, "num_pos": num_pos}
