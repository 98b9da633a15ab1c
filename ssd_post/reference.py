"""The readable per-image, per-class loop: the oracle of the tests and the baseline
of the benchmarks. It states the semantics of ssd_post in plain torch ops."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torchvision
from torch import Tensor

from .box_coder import BoxCoder, clip_boxes
from .config import PostprocessConfig
from .formats import Detections
from .linear_coder import LinearBoxCoder
from .inputs import Anchors, ImageSizes, LevelSizes
from .family import cxcywh_to_xyxy, flatten_slots
from .inputs import check_level_sizes, check_score_factor, normalize_inputs


def rank_order(scores: Tensor) -> Tensor:
    """Indices by decreasing score, equal scores in index order."""
    return torch.sort(scores, descending=True, stable=True).indices


def postprocess_loop(
    locs: Tensor,
    logits: Tensor,
    anchors: Optional[Anchors] = None,
    image_sizes: Optional[ImageSizes] = None,
    config: Optional[PostprocessConfig] = None,
    *,
    level_sizes: Optional[LevelSizes] = None,
    score_factor: Optional[Tensor] = None,
    centerness: Optional[Tensor] = None,
) -> Detections:
    """Same contract as :func:`ssd_post.postprocess`, one image at a time: the
    candidates of ``select_topk_loop``, every box decoded (or converted) and clipped,
    ``torchvision.ops.nms`` per class (per image when class-agnostic), the best
    ``detections_per_img`` survivors."""
    config = config or PostprocessConfig()
    locs, logits, anchors, sizes = normalize_inputs(
        locs, logits, anchors, image_sizes, config.inverted_boxes
    )
    batch, num_anchors, num_classes = logits.shape
    factor = check_score_factor(
        score_factor, centerness, config.score_factor_mode, batch, num_anchors
    )
    if config.selection == "per_level":
        level_sizes = check_level_sizes(level_sizes, num_anchors)
    else:
        level_sizes = [num_anchors]
    padded = config.padded_detections(num_anchors, num_classes)
    results = []
    for i in range(batch):
        boxes = _image_boxes(locs[i], None if anchors is None else anchors, i, config)
        if config.clip_boxes:
            height, width = (int(v) for v in sizes[i].tolist())
            boxes = clip_boxes(boxes, (height, width))
        flat, image_scores, counts = select_topk_loop(
            logits[i : i + 1],
            None if factor is None else factor[i : i + 1],
            level_sizes,
            *config.select_topk_arguments(num_classes),
        )
        valid = flat[0] >= 0
        flat, image_scores = flat[0][valid], image_scores[0][valid]
        anchor_idxs, image_labels = flat // num_classes, flat % num_classes
        image_boxes = boxes[anchor_idxs]
        groups = torch.zeros_like(image_labels) if config.class_agnostic else image_labels
        keep = batched_nms_reference(image_boxes, image_scores, groups, config.nms_thresh)
        keep = keep[: config.detections_per_img]
        results.append(
            {
                "boxes": image_boxes[keep],
                "scores": image_scores[keep],
                "labels": image_labels[keep],
                "anchor_indices": anchor_idxs[keep],
            }
        )
    if batch == 0:
        return Detections(
            locs.new_zeros((0, padded, 4), dtype=torch.float32),
            locs.new_zeros((0, padded), dtype=torch.float32),
            locs.new_zeros((0, padded), dtype=torch.int64),
            locs.new_zeros((0,), dtype=torch.int64),
            locs.new_zeros((0, padded), dtype=torch.int64),
        )
    out = Detections.from_list(results, padded)
    anchor_out = torch.full((batch, padded), -1, dtype=torch.int64)
    for i, result in enumerate(results):
        anchor_out[i, : len(result["anchor_indices"])] = result["anchor_indices"]
    out.anchor_indices = anchor_out
    return out


def _image_boxes(
    locs: Tensor, anchors: Optional[Tensor], image: int, config: PostprocessConfig
) -> Tensor:
    """Float32 xyxy boxes (Tensor[A, 4]) of one image's anchors, before clipping."""
    if config.box_coder == "none":
        boxes = cxcywh_to_xyxy(locs) if config.box_format == "cxcywh" else locs
        return boxes.float()
    image_anchors = anchors if anchors.dim() == 2 else anchors[image]
    coder = LinearBoxCoder() if config.box_coder == "linear" else BoxCoder(config.box_weights)
    return coder.decode(locs, image_anchors)


def select_flat_loop(
    logits: Tensor,
    score_factor: Optional[Tensor],
    config: PostprocessConfig,
    level_sizes: List[int],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``select_topk_loop`` for ``config`` as flat candidate lists: the oracle of
    ``family.select_flat``.

    Args:
        logits (Tensor[B, A, C]), score_factor (Tensor[B, A, 1] or None: the factor of
        ``config.score_factor_mode``), level_sizes ([A] unless per level).

    Returns:
        image, anchor, label (Tensor[N] int64) and score (Tensor[N] float32), by
        image, then group, then rank (score descending, equal scores by anchor * C
        + class), at most ``topk_candidates`` per group.
    """
    flat, scores, _ = select_topk_loop(
        logits, score_factor, level_sizes, *config.select_topk_arguments(logits.shape[2])
    )
    return flatten_slots(flat, scores, logits.shape[2])


def _block_scores(
    logits: Tensor,
    factor: Optional[Tensor],
    score_activation: str,
    factor_mode: str,
    factor_logits: bool,
) -> Tuple[Tensor, Tensor]:
    """Selection and reported scores (Tensor[A_l, C] float32 each) of one (image,
    level) block: the activation over the whole block as torch computes it, joined
    with the per-anchor factor (Tensor[A_l] or None) by ``factor_mode``."""
    logits = logits.float()
    if score_activation == "softmax":
        probs = logits.softmax(-1)
    elif score_activation == "sigmoid":
        probs = logits.sigmoid()
    else:
        probs = logits
    if factor is None:
        return probs, probs
    factor = factor.float()
    if factor_logits:
        factor = factor.sigmoid()
    product = probs * factor[:, None]
    if factor_mode == "sqrt":
        return torch.sqrt(product), torch.sqrt(product)
    if factor_mode == "before_threshold":
        return product, product
    return probs, product  # after_selection


def _best_columns(scores: Tensor, eligible: Tensor) -> Tensor:
    """Mask (Tensor[A, C] bool) of each row's best eligible column: the highest score,
    equal scores to the lower column, NaN ignored; no column for a row with none."""
    masked = torch.where(eligible & ~scores.isnan(), scores, torch.tensor(float("-inf")))
    best = torch.zeros_like(eligible)
    rows = torch.arange(scores.shape[0])
    has_any = (eligible & ~scores.isnan()).any(1)
    # argmax returns the first maximum: the lower column among equal scores.
    best[rows[has_any], masked[has_any].argmax(1)] = True
    return best


def select_topk_loop(
    logits: Tensor,
    score_factor: Optional[Tensor],
    level_sizes: List[int],
    score_thresh: float,
    topk_candidates: int,
    background_class: Optional[int],
    score_activation: str = "sigmoid",
    factor_mode: str = "sqrt",
    factor_logits: bool = True,
    single_label: bool = False,
    classes: Optional[List[int]] = None,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The oracle of ``ssd_post::select_topk`` (same arguments, same outputs), one
    image and one (image, level) block at a time in plain torch ops.

    Per block ``logits[b, start:end]`` (float32): the class probabilities are
    ``score_activation`` of the whole block ("softmax" over C, "sigmoid", "none": as
    given); with ``score_factor`` f (``[B, A]`` or ``[B, A, 1]``; sigmoid of the
    block's slice when ``factor_logits``), the selection score is sqrt(p * f)
    ("sqrt"), p * f ("before_threshold") or p ("after_selection", whose reported score
    is p * f). Eligible columns: all but ``background_class``; with ``single_label``
    only each anchor's best one (highest selection score, equal scores to the lower
    column, NaN ignored); then only the columns of ``classes`` when given. A pair is
    a candidate when eligible and its selection score is ``> score_thresh``; each
    group (the level; ``per_class``: the class, over the one level) keeps its
    ``topk_candidates`` best by selection score, equal scores by flat index
    anchor * C + class.

    Returns:
        flat (Tensor[B, G, k] int64, -1 past the count), scores (Tensor[B, G, k]
        float32, reported scores, 0 past the count), counts (Tensor[B, G] int64);
        k = ``ops.select_capacity``.
    """
    from .ops import select_capacity

    batch, num_anchors, num_classes = logits.shape
    level_sizes = [int(n) for n in level_sizes]
    groups = num_classes if per_class else len(level_sizes)
    k = select_capacity(level_sizes, num_classes, topk_candidates, single_label, per_class)
    flat_out = torch.full((batch, groups, k), -1, dtype=torch.int64)
    score_out = torch.zeros((batch, groups, k), dtype=torch.float32)
    count_out = torch.zeros((batch, groups), dtype=torch.int64)
    factor = None if score_factor is None else score_factor.reshape(batch, num_anchors)
    columns = torch.ones(num_classes, dtype=torch.bool)
    if background_class is not None:
        columns[background_class] = False
    allowed = torch.ones(num_classes, dtype=torch.bool)
    if classes is not None:
        allowed = torch.zeros(num_classes, dtype=torch.bool)
        allowed[list(classes)] = True

    def write(b: int, group: int, flat: Tensor, select: Tensor, report: Tensor) -> None:
        order = rank_order(select)[:k]  # flat increases: equal scores stay in flat order
        n = len(order)
        flat_out[b, group, :n] = flat[order]
        score_out[b, group, :n] = report[order]
        count_out[b, group] = n

    for b in range(batch):
        start = 0
        for level, size in enumerate(level_sizes):
            block = slice(start, start + size)
            select, report = _block_scores(
                logits[b, block],
                None if factor is None else factor[b, block],
                score_activation,
                factor_mode,
                factor_logits,
            )
            eligible = columns[None, :].expand(size, num_classes)
            if single_label:
                eligible = _best_columns(select, eligible)
            passing = eligible & allowed[None, :] & (select > score_thresh)
            if per_class:
                for c in range(num_classes):
                    anchors = torch.nonzero(passing[:, c]).flatten()
                    if len(anchors):
                        write(
                            b,
                            c,
                            (start + anchors) * num_classes + c,
                            select[anchors, c],
                            report[anchors, c],
                        )
            else:
                pairs = torch.nonzero(passing.flatten()).flatten()
                write(
                    b,
                    level,
                    start * num_classes + pairs,
                    select.flatten()[pairs],
                    report.flatten()[pairs],
                )
            start += size
    return flat_out, score_out, count_out


def batched_nms_reference(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    max_kept: Optional[int] = None,
    keys_per_image: Optional[int] = None,
) -> Tensor:
    """Per group of equal idxs, ``torchvision.ops.nms``; kept indices by decreasing
    score, equal scores in index order. With ``max_kept``, that full answer
    truncated: only the first ``max_kept`` survivors of each group (or, with
    ``keys_per_image``, of each image ``idx // keys_per_image``) in that order."""
    kept = []
    for group in torch.unique(idxs):
        members = torch.nonzero(idxs == group).flatten()
        members = members[rank_order(scores[members])]
        kept.append(
            members[
                torchvision.ops.nms(boxes[members].float(), scores[members].float(), iou_threshold)
            ]
        )
    if not kept:
        return torch.zeros(0, dtype=torch.int64)
    kept = torch.cat(kept)
    # Index order first, then a stable sort by score: equal scores stay in index order.
    kept = kept.sort().values
    kept = kept[rank_order(scores[kept])]
    if max_kept is None:
        return kept
    counted = (
        idxs if keys_per_image is None else torch.div(idxs, keys_per_image, rounding_mode="floor")
    )
    seen: Dict[int, int] = {}
    truncated = []
    for i in kept.tolist():
        key = int(counted[i])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= max_kept:
            truncated.append(i)
    return torch.tensor(truncated, dtype=torch.int64)


def batched_nms_padded_loop(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float,
    max_kept: int,
    class_agnostic: bool = False,
) -> Tuple[Tensor, Tensor]:
    """The oracle of ``ssd_post.ops.batched_nms_padded``: one image at a time, its
    non-empty slots (label >= 0) through ``batched_nms_reference`` (torchvision's
    NMS per label, survivors by decreasing score, equal scores by slot), the first
    ``max_kept`` survivors kept. That is ``torchvision.ops.batched_nms`` per image
    without its accidents: no label offsets added to the coordinates (they round
    float32 boxes) and a defined order for equal scores (tests/test_batched_nms_padded.py
    compares with torchvision's own function where those cannot matter).

    Args:
        boxes (Tensor[B, M, 4]), scores (Tensor[B, M]), labels (Tensor[B, M] int64).

    Returns:
        indices (Tensor[B, min(max_kept, M)] int64, -1 past the count), counts
        (Tensor[B] int64).
    """
    batch, slots = scores.shape
    indices = torch.full((batch, min(max_kept, slots)), -1, dtype=torch.int64)
    counts = torch.zeros(batch, dtype=torch.int64)
    for image in range(batch):
        filled = torch.nonzero(labels[image] >= 0).flatten()
        groups = torch.zeros_like(filled) if class_agnostic else labels[image, filled]
        keep = batched_nms_reference(
            boxes[image, filled].float(), scores[image, filled].float(), groups, iou_threshold
        )[:max_kept]
        indices[image, : len(keep)] = filled[keep]
        counts[image] = len(keep)
    return indices, counts


def torchvision_postprocess(
    locs: Tensor,
    logits: Tensor,
    anchors: Anchors,
    image_sizes: ImageSizes,
    config: Optional[PostprocessConfig] = None,
    *,
    level_sizes: Optional[LevelSizes] = None,
    centerness: Optional[Tensor] = None,
) -> Detections:
    """torchvision's own ``postprocess_detections`` (its per-image loop) on these
    tensors with the thresholds of ``config``: the baseline users compare with.

    ``config.selection="per_class"`` runs ``SSD``'s (softmax, background class 0,
    clipping only); ``"per_level"`` runs ``RetinaNet``'s (sigmoid) or ``FCOS``'s
    (sigmoid with centerness, linear coder), which take the head outputs split by
    ``level_sizes``.
    """
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.ssd import SSD

    config = config or PostprocessConfig()
    if config.selection == "per_level":
        return _torchvision_per_level(
            locs, logits, anchors, image_sizes, config, level_sizes, centerness
        )
    if (
        config.score_activation != "softmax"
        or config.background_class != 0
        or not config.clip_boxes
    ):
        raise ValueError(
            "torchvision's SSD postprocess only has softmax, background_class=0 and clipping"
        )
    locs, logits, anchors, sizes = normalize_inputs(locs, logits, anchors, image_sizes)
    head_outputs = {"bbox_regression": locs, "cls_logits": logits}
    results = SSD.postprocess_detections(
        _torchvision_owner(config, det_utils.BoxCoder(weights=config.box_weights)),
        head_outputs,
        _per_image(anchors, logits.shape[0]),
        _shapes(sizes),
    )
    if not results:
        return postprocess_loop(locs, logits, anchors, sizes, config)
    return Detections.from_list(results, config.detections_per_img)


def _torchvision_owner(config: PostprocessConfig, box_coder) -> SimpleNamespace:
    """The attributes torchvision's ``postprocess_detections`` reads off its model."""
    return SimpleNamespace(
        box_coder=box_coder,
        score_thresh=config.score_thresh,
        nms_thresh=config.nms_thresh,
        topk_candidates=config.topk_candidates,
        detections_per_img=config.detections_per_img,
    )


def _shapes(sizes: Tensor) -> List[Tuple[int, int]]:
    """Image sizes (Tensor[B, 2]) as torchvision's ``image_shapes``: (h, w) ints."""
    return [tuple(int(v) for v in hw) for hw in sizes.tolist()]


def _per_image(anchors: Tensor, batch: int) -> List[Tensor]:
    return [anchors if anchors.dim() == 2 else anchors[i] for i in range(batch)]


def _torchvision_per_level(
    locs: Tensor,
    logits: Tensor,
    anchors: Anchors,
    image_sizes: ImageSizes,
    config: PostprocessConfig,
    level_sizes: Optional[LevelSizes],
    centerness: Optional[Tensor],
) -> Detections:
    from torchvision.models.detection import _utils as det_utils
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet

    if config.background_class is not None or not config.clip_boxes:
        raise ValueError(
            "torchvision's RetinaNet / FCOS postprocess has no background column and always clips"
        )
    locs, logits, anchors, sizes = normalize_inputs(locs, logits, anchors, image_sizes)
    batch, num_anchors, _ = logits.shape
    split = check_level_sizes(level_sizes, num_anchors)
    head = {
        "cls_logits": list(logits.split(split, 1)),
        "bbox_regression": list(locs.split(split, 1)),
    }
    plain = (
        config.score_activation == "sigmoid"
        and config.label_mode == "multi"
        and not config.class_agnostic
        and config.classes is None
    )
    if plain and config.score_factor_mode == "sqrt" and config.score_factor_logits:
        if config.box_coder != "linear":
            raise ValueError("torchvision's FCOS postprocess decodes with the linear coder")
        ctr = check_score_factor(None, centerness, "sqrt", batch, num_anchors)
        head["bbox_ctrness"] = list(ctr.split(split, 1))
        owner = _torchvision_owner(config, det_utils.BoxLinearCoder(normalize_by_size=True))
        method = FCOS.postprocess_detections
    elif plain and config.score_factor_mode is None and config.box_coder == "box":
        owner = _torchvision_owner(config, det_utils.BoxCoder(weights=config.box_weights))
        method = RetinaNet.postprocess_detections
    else:
        raise ValueError(
            "torchvision's per-level postprocesses are RetinaNet's (sigmoid, box coder) and "
            f"FCOS's (sigmoid with a sqrt centerness factor, linear coder), got "
            f"{config.score_activation!r}, factor {config.score_factor_mode!r}, "
            f"box_coder={config.box_coder!r}"
        )
    per_image = [list(a.split(split)) for a in _per_image(anchors, batch)]
    return Detections.from_list(
        method(owner, head, per_image, _shapes(sizes)), config.detections_per_img
    )


def best_class_candidates_loop(
    scores: Tensor,
    score_thresh: float,
    max_candidates: int,
    classes: Optional[List[int]] = None,
    boxes: Optional[Tensor] = None,
    box_format: str = "xyxy",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The oracle of ``ops.best_class_candidates``, one anchor at a time in Python
    floats: an anchor with a NaN score is skipped; its best class is the first
    maximum; it is a candidate when that score is ``> score_thresh`` rounded to
    float32 and the class is allowed; more than ``max_candidates`` are cut to the
    best by (score descending, anchor ascending), then put back in anchor order.
    The slots are as many as the fullest image keeps.

    Args:
        scores (Tensor[B, C, N]), boxes (Tensor[B, 4, N] or None): converted with
        ``cxcywh_to_xyxy`` in their dtype when ``box_format="cxcywh"``.

    Returns:
        anchor, score, label (Tensor[B, M]; -1, 0 and -1 past the count), count
        (Tensor[B] int64) and boxes (Tensor[B, M, 4] float32, zeros past the count;
        [B, 0, 4] without boxes).
    """
    batch, _, num_anchors = scores.shape
    width = min(num_anchors, max_candidates)
    thresh = torch.tensor(score_thresh, dtype=torch.float32).item()
    kept = []
    for image in scores.float().cpu():
        found = []
        for a, column in enumerate(image.T.tolist()):
            if any(math.isnan(v) for v in column):
                continue
            best = max(column)
            cls = column.index(best)
            if best > thresh and (classes is None or cls in classes):
                found.append((a, best, cls))
        if len(found) > width:
            found = sorted(sorted(found, key=lambda f: (-f[1], f[0]))[:width])
        kept.append(found)
    width = max((len(found) for found in kept), default=0)
    anchor = torch.full((batch, width), -1, dtype=torch.int64)
    score = torch.zeros((batch, width), dtype=torch.float32)
    label = torch.full((batch, width), -1, dtype=torch.int64)
    count = torch.zeros(batch, dtype=torch.int64)
    out_boxes = torch.zeros((batch, width if boxes is not None else 0, 4), dtype=torch.float32)
    for b, found in enumerate(kept):
        count[b] = len(found)
        for k, (a, best, cls) in enumerate(found):
            anchor[b, k], score[b, k], label[b, k] = a, best, cls
            if boxes is not None:
                box = boxes[b, :, a].cpu()
                box = cxcywh_to_xyxy(box) if box_format == "cxcywh" else box
                out_boxes[b, k] = box.float()
    return anchor, score, label, count, out_boxes


def yolo_nms_loop(
    prediction: Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Optional[List[int]] = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    nc: int = 0,
    max_nms: int = 30000,
) -> Tuple[List[Tensor], List[Tensor]]:
    """The oracle of ``ssd_post.non_max_suppression``: YOLOv8's documented NMS, one
    image and one class at a time, exact (no class-offset trick), equal scores to the
    lower anchor, then the lower class.

    Args:
        prediction (Tensor[B, 4 + nc + nm, N]): cx, cy, w, h, class probabilities,
            extra columns.

    Returns:
        (detections, anchors): per image Tensor[n, 6 + nm] (x1, y1, x2, y2, conf, class,
        extra...) by decreasing conf, and the anchor index of each row (Tensor[n] int64).
    """
    nc = nc or prediction.shape[1] - 4
    detections, anchors = [], []
    for image in prediction:
        rows = image.T  # [N, 4 + nc + nm]: one anchor a row
        cx, cy, w, h = rows[:, :4].unbind(1)
        boxes = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=1)
        probs, extra = rows[:, 4 : 4 + nc], rows[:, 4 + nc :]
        if multi_label:
            # Every (anchor, class) pair over the threshold, anchor-major.
            anchor, label = torch.nonzero(probs > conf_thres, as_tuple=True)
            score = probs[anchor, label]
        else:
            score, label = probs.max(1)  # the first (lowest) class at equal probabilities
            anchor = torch.nonzero(score > conf_thres).flatten()
            score, label = score[anchor], label[anchor]
        if classes is not None:
            allowed = torch.tensor([int(c) in classes for c in label.tolist()], dtype=torch.bool)
            anchor, label, score = anchor[allowed], label[allowed], score[allowed]
        # Candidates in (anchor, class) order, then ranked by score: the order is the
        # tie rule of the cap, of NMS and of the output.
        order = rank_order(score)[:max_nms]
        anchor, label, score = anchor[order], label[order], score[order]
        if agnostic:
            groups = [torch.ones_like(label, dtype=torch.bool)]
        else:
            groups = [label == c for c in torch.unique(label).tolist()]
        kept = []
        for members in groups:
            members = torch.nonzero(members).flatten()  # still in rank order
            survivors = torchvision.ops.nms(
                boxes[anchor[members]].float(), score[members].float(), iou_thres
            )
            kept.append(members[survivors])
        kept = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.int64)
        kept = kept.sort().values[:max_det] if len(kept) else kept  # rank order
        anchor, label, score = anchor[kept], label[kept], score[kept]
        detections.append(
            torch.cat(
                (
                    boxes[anchor],
                    score[:, None],
                    label[:, None].to(prediction.dtype),
                    extra[anchor],
                ),
                dim=1,
            )
        )
        anchors.append(anchor)
    return detections, anchors
