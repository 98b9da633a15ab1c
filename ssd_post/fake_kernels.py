"""Fake (meta) kernels of the compiled ops: the output shapes torch.compile and
torch.export trace with, computed without running anything.

They check devices with the same rules as the eager entry points (ssd_post.inputs):
a ``meta`` tensor next to a CPU tensor would otherwise reach a fake kernel and
pass. Imported by ``ssd_post/__init__.py``; registered only when the ops exist.
"""

from __future__ import annotations

import torch

from ._extension import extension_loaded
from .config import padded_detections
from .inputs import check_image_sizes_device
from .ops import check_same_device, select_capacity


def _decode_threshold_flatten_fake(
    locs,
    logits,
    anchors,
    image_sizes,
    score_thresh,
    topk_candidates,
    box_weights,
    score_activation,
    background_class,
    clip_boxes,
):
    torch._check(locs.dim() == 3 and logits.dim() == 3, lambda: "locs and logits should be 3d")
    check_same_device("locs", {"locs": locs, "logits": logits, "anchors": anchors})
    check_image_sizes_device(image_sizes, locs)
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        locs.new_empty((n, 4), dtype=torch.float32),
        locs.new_empty((n,), dtype=torch.float32),
        locs.new_empty((n,), dtype=torch.int64),
    )


def _batched_nms_fake(boxes, scores, idxs, iou_threshold, max_kept=None, keys_per_image=None):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "boxes should be [N, 4]")
    check_same_device("boxes", {"boxes": boxes, "scores": scores, "idxs": idxs})
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


def _best_class_fake(scores):
    torch._check(scores.dim() == 3, lambda: "scores should be [B, C, N]")
    batch, anchors = scores.shape[0], scores.shape[2]
    return (
        scores.new_empty((batch, anchors), dtype=torch.float32),
        scores.new_empty((batch, anchors), dtype=torch.int64),
    )


def _best_class_candidates_fake(
    scores, score_thresh, max_candidates, classes=None, boxes=None, box_format="xyxy"
):
    torch._check(scores.dim() == 3, lambda: "scores should be [B, C, N]")
    # The width is the most candidates an image keeps: known once the op has run.
    batch, width = scores.shape[0], torch.library.get_ctx().new_dynamic_size()
    return (
        scores.new_empty((batch, width), dtype=torch.int64),
        scores.new_empty((batch, width), dtype=torch.float32),
        scores.new_empty((batch, width), dtype=torch.int64),
        scores.new_empty((batch,), dtype=torch.int64),
        scores.new_empty((batch, width if boxes is not None else 0, 4), dtype=torch.float32),
    )


def _decode_boxes_fake(rel_codes, anchors, weights):
    shape = torch.broadcast_shapes(rel_codes.shape, anchors.shape)
    return rel_codes.new_empty(shape, dtype=torch.float32)


def _batched_nms_padded_fake(boxes, scores, labels, iou_threshold, max_kept, class_agnostic=False):
    torch._check(boxes.dim() == 3 and boxes.size(2) == 4, lambda: "boxes should be [B, M, 4]")
    check_same_device("boxes", {"boxes": boxes, "scores": scores, "labels": labels})
    batch, slots = boxes.shape[0], boxes.shape[1]
    # padded_nms_capacity (csrc/common/checks.h); sym_min keeps a symbolic M symbolic.
    k = torch.sym_min(max_kept, slots)
    return (
        boxes.new_empty((batch, k), dtype=torch.int64),
        boxes.new_empty((batch,), dtype=torch.int64),
    )


def _postprocess_fake(
    locs,
    logits,
    anchors,
    image_sizes,
    score_thresh,
    nms_thresh,
    topk_candidates,
    detections_per_img,
    box_weights,
    score_activation,
    background_class,
    clip_boxes,
):
    torch._check(logits.dim() == 3, lambda: "logits should be [B, A, C]")
    check_same_device("locs", {"locs": locs, "logits": logits, "anchors": anchors})
    check_image_sizes_device(image_sizes, locs)
    batch, num_anchors, num_classes = logits.shape
    foreground = num_classes - (0 if background_class is None else 1)
    k = padded_detections(detections_per_img, topk_candidates, num_anchors, foreground)
    return (
        locs.new_empty((batch, k, 4), dtype=torch.float32),
        locs.new_empty((batch, k), dtype=torch.float32),
        locs.new_empty((batch, k), dtype=torch.int64),
        locs.new_empty((batch,), dtype=torch.int64),
        locs.new_empty((batch, k), dtype=torch.int64),
    )


def _select_topk_fake(
    logits,
    score_factor,
    level_sizes,
    score_thresh,
    topk_candidates,
    background_class,
    score_activation="sigmoid",
    factor_mode="sqrt",
    factor_logits=True,
    single_label=False,
    classes=None,
    per_class=False,
):
    torch._check(logits.dim() == 3, lambda: "logits should be [B, A, C]")
    if score_factor is not None:
        check_same_device("logits", {"logits": logits, "score_factor": score_factor})
    batch, _, num_classes = logits.shape
    groups = num_classes if per_class else len(level_sizes)
    k = select_capacity(list(level_sizes), num_classes, topk_candidates, single_label, per_class)
    return (
        logits.new_empty((batch, groups, k), dtype=torch.int64),
        logits.new_empty((batch, groups, k), dtype=torch.float32),
        logits.new_empty((batch, groups), dtype=torch.int64),
    )


if extension_loaded():
    torch.library.register_fake("ssd_post::decode_threshold_flatten")(
        _decode_threshold_flatten_fake
    )
    torch.library.register_fake("ssd_post::batched_nms")(_batched_nms_fake)
    torch.library.register_fake("ssd_post::batched_nms_padded")(_batched_nms_padded_fake)
    torch.library.register_fake("ssd_post::best_class")(_best_class_fake)
    torch.library.register_fake("ssd_post::best_class_candidates")(_best_class_candidates_fake)
    torch.library.register_fake("ssd_post::decode_boxes")(_decode_boxes_fake)
    torch.library.register_fake("ssd_post::_best_class_candidates_composite")(
        _best_class_candidates_fake
    )
    torch.library.register_fake("ssd_post::postprocess")(_postprocess_fake)
    torch.library.register_fake("ssd_post::select_topk")(_select_topk_fake)
