"""The readable per-image, per-class loop: the oracle of the tests and the baseline
of the benchmarks. It states the semantics of ssd_post in plain torch ops."""
from __future__ import annotations

from typing import Optional

import torch
import torchvision
from torch import Tensor

from .box_coder import BoxCoder, clip_boxes
from .config import PostprocessConfig
from .formats import Detections
from .postprocess import Anchors, ImageSizes, normalize_inputs


def scores_from_logits(logits: Tensor, activation: str) -> Tensor:
    """Per-class probabilities (Tensor[..., C]) in float32."""
    logits = logits.float()
    return logits.softmax(-1) if activation == "softmax" else logits.sigmoid()


def rank_order(scores: Tensor) -> Tensor:
    """Indices by decreasing score, equal scores in index order."""
    return torch.sort(scores, descending=True, stable=True).indices


def postprocess_loop(
    locs: Tensor,
    logits: Tensor,
    anchors: Anchors,
    image_sizes: ImageSizes,
    config: Optional[PostprocessConfig] = None,
) -> Detections:
    """Same contract as :func:`ssd_post.postprocess`, one image and one class at a time."""
    config = config or PostprocessConfig()
    locs, logits, anchors, sizes = normalize_inputs(locs, logits, anchors, image_sizes,
                                                    config.inverted_boxes)
    coder = BoxCoder(config.box_weights)
    batch, num_anchors, num_classes = logits.shape
    padded = config.padded_detections(num_anchors, num_classes)
    results = []
    for i in range(batch):
        image_anchors = anchors if anchors.dim() == 2 else anchors[i]
        boxes = coder.decode(locs[i], image_anchors)
        if config.clip_boxes:
            height, width = (int(v) for v in sizes[i].tolist())
            boxes = clip_boxes(boxes, (height, width))
        scores = scores_from_logits(logits[i], config.score_activation)
        image_boxes, image_scores, image_labels = [], [], []
        for label in range(num_classes):
            if label == config.background_class:
                continue
            class_scores = scores[:, label]
            candidates = torch.nonzero(class_scores > config.score_thresh).flatten()
            order = rank_order(class_scores[candidates])[: config.topk_candidates]
            candidates = candidates[order]
            image_boxes.append(boxes[candidates])
            image_scores.append(class_scores[candidates])
            image_labels.append(torch.full((len(candidates),), label, dtype=torch.int64))
        image_boxes = torch.cat(image_boxes) if image_boxes else boxes.new_zeros((0, 4))
        image_scores = torch.cat(image_scores) if image_scores else boxes.new_zeros((0,))
        image_labels = torch.cat(image_labels) if image_labels else torch.zeros(0, dtype=torch.int64)
        keep = batched_nms_reference(image_boxes, image_scores, image_labels, config.nms_thresh)
        keep = keep[: config.detections_per_img]
        results.append({"boxes": image_boxes[keep], "scores": image_scores[keep], "labels": image_labels[keep]})
    out = Detections.from_list(results, padded)
    if batch == 0:
        out = Detections(locs.new_zeros((0, padded, 4), dtype=torch.float32),
                         locs.new_zeros((0, padded), dtype=torch.float32),
                         locs.new_zeros((0, padded), dtype=torch.int64),
                         locs.new_zeros((0,), dtype=torch.int64))
    return out


def batched_nms_reference(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Per group of equal idxs, ``torchvision.ops.nms``; kept indices by decreasing
    score, equal scores in index order."""
    kept = []
    for group in torch.unique(idxs):
        members = torch.nonzero(idxs == group).flatten()
        members = members[rank_order(scores[members])]
        kept.append(members[torchvision.ops.nms(boxes[members].float(), scores[members].float(), iou_threshold)])
    if not kept:
        return torch.zeros(0, dtype=torch.int64)
    kept = torch.cat(kept)
    # Index order first, then a stable sort by score: equal scores stay in index order.
    kept = kept.sort().values
    return kept[rank_order(scores[kept])]


def torchvision_postprocess(
    locs: Tensor,
    logits: Tensor,
    anchors: Anchors,
    image_sizes: ImageSizes,
    config: Optional[PostprocessConfig] = None,
) -> Detections:
    """torchvision's own ``SSD.postprocess_detections`` (its per-image loop), run on
    these tensors with the thresholds of ``config``. The baseline users compare with.

    Only the softmax activation with background class 0 exists there.
    """
    from types import SimpleNamespace

    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.ssd import SSD

    config = config or PostprocessConfig()
    if config.score_activation != "softmax" or config.background_class != 0 or not config.clip_boxes:
        raise ValueError("torchvision's SSD postprocess only has softmax, background_class=0 and clipping")
    locs, logits, anchors, sizes = normalize_inputs(locs, logits, anchors, image_sizes)
    fake_ssd = SimpleNamespace(
        box_coder=det_utils.BoxCoder(weights=config.box_weights),
        score_thresh=config.score_thresh,
        topk_candidates=config.topk_candidates,
        nms_thresh=config.nms_thresh,
        detections_per_img=config.detections_per_img,
    )
    per_image_anchors = [anchors if anchors.dim() == 2 else anchors[i] for i in range(logits.shape[0])]
    shapes = [tuple(int(v) for v in hw) for hw in sizes.tolist()]
    head_outputs = {"bbox_regression": locs, "cls_logits": logits}
    results = SSD.postprocess_detections(fake_ssd, head_outputs, per_image_anchors, shapes)
    if not results:
        return postprocess_loop(locs, logits, anchors, sizes, config)
    return Detections.from_list(results, config.detections_per_img)
