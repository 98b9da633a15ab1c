"""A drop-in ``non_max_suppression`` for YOLOv8 / YOLO11 outputs.

    detections = ssd_post.non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.7)

Batched torch ops plus one compiled ``batched_nms`` call for the whole batch: no
loop over images, no time limit, no coordinate-offset trick.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import real_scalar, unit_scalar, whole_scalar
from .family import cxcywh_to_xyxy
from .ops import batched_nms

__all__ = ["non_max_suppression", "yolo_candidates", "cxcywh_to_xyxy"]


def _check_arguments(
    prediction,
    conf_thres,
    iou_thres,
    classes,
    agnostic,
    multi_label,
    labels,
    max_det,
    nc,
    max_time_img,
    max_nms,
    max_wh,
    rotated,
    end2end,
    return_idxs,
) -> Tuple[Tensor, float, float, Optional[List[int]], int, int, int, int]:
    """The checks of ``non_max_suppression``: a ValueError naming the argument on bad
    input; returns (prediction, conf_thres, iou_thres, classes, max_det, nc, nm,
    max_nms) normalised."""
    if isinstance(prediction, (list, tuple)):
        # YOLOv8 in validation mode returns (inference output, raw head outputs).
        if not prediction:
            raise ValueError("prediction should be a Tensor or a non-empty list/tuple, got []")
        prediction = prediction[0]
    if not isinstance(prediction, Tensor):
        raise ValueError(f"prediction should be a Tensor, got {type(prediction).__name__}")
    if prediction.dim() != 3:
        raise ValueError(
            "prediction should be [B, 4 + nc + nm, N] (YOLOv8/11 layout), got shape "
            f"{tuple(prediction.shape)}"
        )
    if not prediction.is_floating_point():
        raise ValueError(f"prediction should be floating point, got {prediction.dtype}")
    for name, flag in (
        ("agnostic", agnostic),
        ("multi_label", multi_label),
        ("return_idxs", return_idxs),
        ("rotated", rotated),
        ("end2end", end2end),
    ):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} should be a bool, got {flag!r}")
    if rotated:
        raise ValueError("rotated=True (oriented boxes) is not supported")
    if end2end:
        raise ValueError(
            "end2end=True is not supported: end-to-end models (YOLOv10, YOLO26) need no NMS"
        )
    if len(labels) != 0:
        raise ValueError("labels (a-priori labels for autolabelling) are not supported; pass ()")
    conf_thres = unit_scalar(conf_thres, "conf_thres")
    iou_thres = unit_scalar(iou_thres, "iou_thres")
    max_det = whole_scalar(max_det, "max_det")
    max_nms = whole_scalar(max_nms, "max_nms")
    channels = prediction.shape[1]
    nc = whole_scalar(nc, "nc", minimum=0)
    if nc == 0:
        nc = channels - 4
    if not 1 <= nc <= channels - 4:
        raise ValueError(
            f"nc should be in [1, channels - 4] = [1, {channels - 4}] for prediction of shape "
            f"{tuple(prediction.shape)}, got {nc}"
        )
    # Accepted for the signature's sake, checked for type only (see the docstring).
    real_scalar(max_time_img, "max_time_img")
    real_scalar(max_wh, "max_wh")
    if classes is not None:
        if isinstance(classes, Tensor):
            classes = classes.flatten().tolist()
        try:
            classes = [whole_scalar(c, "classes", minimum=0) for c in classes]
        except TypeError:
            raise ValueError(f"classes should be a sequence of ints, got {classes!r}") from None
    return prediction, conf_thres, iou_thres, classes, max_det, nc, channels - 4 - nc, max_nms


def _cap_per_image(image: Tensor, score: Tensor, batch: int, max_nms: int) -> Optional[Tensor]:
    """Mask of the candidates each image keeps under its cap of ``max_nms``: its
    ``max_nms`` best scores, equal scores to the lower candidate index; None when no
    image has more than ``max_nms``.

    ``image`` (Tensor[K] int64, non-decreasing) and ``score`` (Tensor[K]) list the
    candidates image after image. One ``kthvalue`` per image over a padded [B, M]
    layout gives each image's max_nms-th best score; all scores above it are kept, and
    of those equal to it only the first ones (in index order) that fill the cap.
    """
    counts = torch.bincount(image, minlength=batch)
    widest = int(counts.max()) if len(image) else 0
    if widest <= max_nms:
        return None
    starts = counts.cumsum(0) - counts
    position = torch.arange(len(image), device=image.device) - starts[image]
    padded = score.new_full((batch, widest), float("-inf"))
    padded[image, position] = score
    # The max_nms-th largest of each row (padding is -inf: rows shorter than the cap
    # get -inf and keep everything).
    cut = padded.kthvalue(widest - max_nms + 1, dim=1).values[image]
    above = score > cut
    at_cut = score == cut
    room = max_nms - torch.zeros_like(counts).index_add_(0, image, above.long())
    # Rank of each candidate among its image's candidates at the cut, in index order.
    equal_before = at_cut.long().cumsum(0) - at_cut.long()
    first_equal = equal_before[starts.clamp(max=max(len(image) - 1, 0))]
    rank_at_cut = equal_before - first_equal[image]
    return above | (at_cut & (rank_at_cut < room[image]))


def _best_class(class_scores: Tensor, conf_thres: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The anchors whose best class probability is ``> conf_thres``, with that
    probability and class (equal probabilities to the lower class).

    One read of ``class_scores`` (Tensor[B, nc, N]): the maximum of each block of about
    sqrt(nc) classes (Tensor[B, blocks, N]; as fast as one amax over all classes), then,
    for the passing anchors only, the first block holding the maximum and the first
    class of that block holding it. Gathering sqrt(nc) + sqrt(nc) values per anchor
    instead of nc matters: each gathered value is a cache miss in this layout.

    Returns:
        (image, anchor, score, label): Tensor[K] each, image after image, by anchor.
    """
    nc = class_scores.shape[1]
    width = math.isqrt(nc - 1) + 1  # ceil(sqrt(nc))
    # A width that divides nc spares the copy that joins a short last block (80: 10).
    divisor = next(d for d in range(width, nc + 1) if nc % d == 0)
    if divisor <= 2 * width:
        width = divisor
    full = nc // width
    blocks = [class_scores[:, : full * width].unflatten(1, (full, width)).amax(2)]
    if full * width < nc:
        blocks.append(class_scores[:, full * width :].amax(1, keepdim=True))
    block_best = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]  # [B, blocks, N]
    image, anchor = (block_best.amax(1) > conf_thres).nonzero(as_tuple=True)
    # argmax: the first block (hence the lowest class) holding the maximum.
    block = block_best.transpose(1, 2)[image, anchor].argmax(1)
    # The classes of that block; past the last class (a short last block) repeat it,
    # after its real column, so the first maximum stays the lowest class.
    columns = (block[:, None] * width + torch.arange(width, device=block.device)).clamp(max=nc - 1)
    values = class_scores.transpose(1, 2)[image[:, None], anchor[:, None], columns]
    score, position = values.max(1)
    label = columns.gather(1, position[:, None]).squeeze(1)
    return image, anchor, score, label


def yolo_candidates(
    prediction: Tensor,
    conf_thres: float,
    nc: int,
    multi_label: bool,
    classes: Optional[Sequence[int]],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (image, anchor, class) pairs that go to NMS before the ``max_nms`` cap.

    Args:
        prediction (Tensor[B, 4 + nc + nm, N]): YOLOv8 layout.
        conf_thres (float): a pair passes when its probability is ``> conf_thres``.
        nc (int): number of class columns.
        multi_label (bool): every passing class of an anchor, else its best class only
            (equal probabilities to the lower class).
        classes (list of int, optional): labels to keep (after the best class is chosen).

    Returns:
        (image, anchor, label, score): Tensor[K] each (int64 x3, prediction's dtype),
        image after image, then by anchor, then by class.
    """
    class_scores = prediction[:, 4 : 4 + nc]  # [B, nc, N], a view
    if multi_label:
        # One read of the scores; the transposed view makes nonzero list the pairs
        # anchor-major inside each image.
        image, anchor, label = (class_scores.transpose(1, 2) > conf_thres).nonzero(as_tuple=True)
        score = class_scores[image, label, anchor]
    else:
        image, anchor, score, label = _best_class(class_scores, conf_thres)
    if classes is not None:
        allowed = torch.isin(label, torch.tensor(classes, dtype=label.dtype, device=label.device))
        image, anchor, label, score = (
            image[allowed],
            anchor[allowed],
            label[allowed],
            score[allowed],
        )
    return image, anchor, label, score


def non_max_suppression(
    prediction: Union[Tensor, Sequence[Tensor]],
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Optional[Sequence[int]] = None,
    agnostic: bool = False,
    multi_label: bool = False,
    labels: Sequence = (),
    max_det: int = 300,
    nc: int = 0,
    max_time_img: float = 0.05,
    max_nms: int = 30000,
    max_wh: int = 7680,
    rotated: bool = False,
    end2end: bool = False,
    return_idxs: bool = False,
) -> Union[List[Tensor], Tuple[List[Tensor], List[Tensor]]]:
    """Greedy NMS of YOLOv8 / YOLO11 outputs, with the arguments and the returned
    structure of ``ultralytics.utils.nms.non_max_suppression``.

    Per image: the candidates are the anchors whose best class probability is
    ``> conf_thres`` (with ``multi_label``, every (anchor, class) pair whose probability
    is ``> conf_thres``); ``classes`` keeps only those labels; the ``max_nms`` most
    confident candidates go to NMS, run per class (``agnostic``: over the whole image),
    a box with IoU ``> iou_thres`` with a kept box being suppressed; the ``max_det``
    most confident survivors are returned by decreasing confidence.

    Args:
        prediction (Tensor[B, 4 + nc + nm, N]): cx, cy, w, h, nc class probabilities
            and nm extra columns (mask coefficients, keypoints...) per anchor; a list or
            tuple is read as its first element (YOLOv8's validation output). Not
            modified. The YOLOv5 layout ``[B, N, 5 + nc]`` (objectness) is not supported.
        conf_thres (float): in [0, 1].
        iou_thres (float): in [0, 1].
        classes (sequence of int, optional): labels to keep.
        agnostic (bool): NMS over all classes of an image together.
        multi_label (bool): several labels per anchor (validation), else its best class
            (equal probabilities to the lower class).
        labels: must be empty (a-priori labels are not supported).
        max_det (int): at most this many detections per image, >= 1.
        nc (int): number of class columns; 0 means ``channels - 4`` (then nm = 0).
        max_time_img (float): accepted, no effect. ultralytics stops NMS after
            ``0.5 + max_time_img * B`` seconds and drops the remaining images; here the
            NMS stops each image after ``max_det`` survivors (its cost is bounded), so
            no time limit is needed and no image is silently dropped.
        max_nms (int): at most this many candidates per image go to NMS, >= 1.
        max_wh (int): accepted, no effect: it is the class offset of ultralytics'
            per-class trick; here each class is its own NMS group, no offset is added.
        rotated (bool): must be False (oriented boxes are not supported).
        end2end (bool): must be False (end-to-end models need no NMS).
        return_idxs (bool): also return the anchor index of each detection.

    Returns:
        A list of B tensors [n_i, 6 + nm] in prediction's dtype: x1, y1, x2, y2, conf,
        class (as a float), the nm extra columns; by decreasing conf. With
        ``return_idxs``, ``(that list, a list of B int64 tensors [n_i])`` holding the
        anchor (column of ``prediction``) of each row.

    Differences from ultralytics:
        - Exact per-class NMS on the true coordinates. ultralytics adds ``cls * max_wh``
          to the float32 coordinates of class ``cls`` and runs one NMS; at offsets up to
          ``79 * 7680`` the float32 grid is 1/16 px, so coordinates are rounded and an
          IoU near ``iou_thres`` can fall on the other side: a few detections can
          differ (tests/test_yolo_nms.py builds such a case).
        - Deterministic ties: equal confidences rank by lower anchor index, then lower
          class, in the ``max_nms`` cap, in NMS and in the output. ultralytics' cap
          uses an unstable sort, so which of equal candidates it keeps is unspecified.
        - The input is never written to (ultralytics converts its boxes in place), the
          anchor indices are always 1-D int64 (also for an image with no detection), and
          the last dimension is always N (ultralytics reads ``[B, N, 6]`` as end-to-end
          output).
    """
    prediction, conf_thres, iou_thres, classes, max_det, nc, nm, max_nms = _check_arguments(
        prediction,
        conf_thres,
        iou_thres,
        classes,
        agnostic,
        multi_label,
        labels,
        max_det,
        nc,
        max_time_img,
        max_nms,
        max_wh,
        rotated,
        end2end,
        return_idxs,
    )
    batch = prediction.shape[0]
    image, anchor, label, score = yolo_candidates(prediction, conf_thres, nc, multi_label, classes)
    capped = _cap_per_image(image, score, batch, max_nms)
    if capped is not None:
        image, anchor, label, score = image[capped], anchor[capped], label[capped], score[capped]

    columns = prediction.transpose(1, 2)  # [B, N, 4 + nc + nm], a view
    boxes = cxcywh_to_xyxy(columns[image, anchor, :4])  # [K, 4]
    keys, keys_per_image = (image, 1) if agnostic else (image * nc + label, nc)
    kept = batched_nms(
        boxes, score, keys, iou_thres, max_kept=max_det, keys_per_image=keys_per_image
    )
    # batched_nms orders the whole batch by score; regroup by image, order kept.
    kept = kept[torch.sort(image[kept], stable=True).indices]
    image, anchor = image[kept], anchor[kept]
    rows = torch.cat(
        (
            boxes[kept],
            score[kept, None],
            label[kept, None].to(prediction.dtype),
            columns[image, anchor, 4 + nc :],
        ),
        dim=1,
    )
    counts = torch.bincount(image, minlength=batch).tolist()
    output = list(rows.split(counts))
    if return_idxs:
        return output, list(anchor.split(counts))
    return output
