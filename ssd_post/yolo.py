"""A drop-in ``non_max_suppression`` for YOLOv8 / YOLO11 outputs.

    detections = ssd_post.non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.7)

The family pipeline (``family.postprocess_family``) with the config ultralytics'
arguments describe (``yolo_config``): the candidates of the whole batch in one op
(``best_class_candidates`` for the best class, ``select_topk`` with
``multi_label``), then one ``batched_nms_padded``; no loop over images, no time
limit, no coordinate-offset trick.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import PostprocessConfig, real_scalar, unit_scalar, whole_scalar
from .family import (
    candidate_slots,
    cxcywh_to_xyxy,
    decode_selected,
    select_candidates,
    suppress_slots,
)
from .ops import best_class_candidates
from .presets import yolo_family_config

__all__ = ["non_max_suppression", "yolo_config", "cxcywh_to_xyxy"]


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
    classes = None if classes is None else checked_classes(classes)
    return prediction, conf_thres, iou_thres, classes, max_det, nc, channels - 4 - nc, max_nms


def checked_classes(classes) -> List[int]:
    """``classes`` (a sequence of ints >= 0, or a tensor of them) as a list of ints;
    a ValueError names anything else."""
    if isinstance(classes, Tensor):
        classes = classes.flatten().tolist()
    try:
        return [whole_scalar(c, "classes", minimum=0) for c in classes]
    except TypeError:
        raise ValueError(f"classes should be a sequence of ints, got {classes!r}") from None


def matching_classes(classes: Sequence[int], nc: int) -> List[int]:
    """The labels ``classes`` (checked ints) can match, sorted: ultralytics compares
    labels with any given values, so repeats and values past the last class match
    nothing more."""
    return sorted({c for c in classes if c < nc})


def yolo_config(
    conf_thres: float,
    iou_thres: float,
    classes: Optional[Sequence[int]],
    agnostic: bool,
    multi_label: bool,
    max_det: int,
    max_nms: int,
) -> PostprocessConfig:
    """The PostprocessConfig that ``non_max_suppression`` runs (arguments already
    checked): class probabilities, decoded cxcywh boxes, one candidate list of at
    most ``max_nms`` per image, no clipping (ultralytics clips when it scales the
    boxes back to the image)."""
    return _cached_yolo_config(
        conf_thres,
        iou_thres,
        None if classes is None else tuple(classes),
        agnostic,
        multi_label,
        max_det,
        max_nms,
    )


@functools.lru_cache(maxsize=64)
def _cached_yolo_config(
    conf_thres: float,
    iou_thres: float,
    classes: Optional[Tuple[int, ...]],
    agnostic: bool,
    multi_label: bool,
    max_det: int,
    max_nms: int,
) -> PostprocessConfig:
    # A frozen dataclass, built and validated once per set of arguments: a video
    # loop calls non_max_suppression with the same ones every frame.
    return yolo_family_config(
        score_thresh=conf_thres,
        nms_thresh=iou_thres,
        topk_candidates=max_nms,
        detections_per_img=max_det,
        label_mode="multi" if multi_label else "single",
        class_agnostic=agnostic,
        classes=classes,
    )


def _best_class_slots(
    scored: Tensor, nc: int, config: PostprocessConfig, classes: Optional[List[int]]
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The candidate slots (anchor, labels, scores: Tensor[B, M], labels -1 in empty
    slots; boxes Tensor[B, M, 4] xyxy float32) of ``label_mode="single"`` on the
    [B, 4 + nc, N] layout, in one read of the class scores
    (``ops.best_class_candidates``): each anchor's best class, thresholded, dropped
    when not in ``classes`` (ultralytics filters, then caps), capped at ``max_nms``
    per image, in anchor order (``batched_nms_padded`` ranks them itself; equal
    scores by lower slot, i.e. lower anchor, as the cap does), with its box."""
    anchor, scores, labels, _, boxes = best_class_candidates(
        scored[:, 4 : 4 + nc],
        config.score_thresh,
        config.topk_candidates,
        classes,
        boxes=scored[:, :4],
        box_format=config.box_format,
    )
    return anchor, labels, scores, boxes


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
    batch, _, num_anchors = prediction.shape
    if classes is not None:
        classes = matching_classes(classes, nc)
        if not classes:
            output = [prediction.new_zeros((0, 6 + nm))] * batch
            no_index = [torch.zeros(0, dtype=torch.int64, device=prediction.device)] * batch
            return (output, no_index) if return_idxs else output
    config = yolo_config(conf_thres, iou_thres, classes, agnostic, multi_label, max_det, max_nms)
    # The ops score float32, float16 and bfloat16; float64 is scored in float32.
    scored = prediction.float() if prediction.dtype == torch.float64 else prediction
    if multi_label:
        # Views of the [B, 4 + nc + nm, N] layout as the family's [B, N, nc].
        flat, scores, counts = select_candidates(
            scored[:, 4 : 4 + nc].mT, None, config, [num_anchors]
        )
        anchor, labels, scores = candidate_slots(flat, scores, counts, nc)
        boxes = decode_selected(scored[:, :4].mT, None, anchor, config)
    else:
        anchor, labels, scores, boxes = _best_class_slots(scored, nc, config, classes)
    padded = config.padded_detections(num_anchors, nc)
    kept, counts = suppress_slots(boxes, scores, labels, config, padded)
    # The survivors by decreasing score, image after image: x1, y1, x2, y2, conf and
    # class of every slot as one [B, M, 6] tensor, indexed at the kept slots, then
    # split per image (a fixed number of ops whatever B).
    image, rank = (kept >= 0).nonzero(as_tuple=True)
    slot = kept[image, rank]
    slots = torch.cat((boxes, scores[..., None], labels[..., None].float()), dim=2)
    rows = slots[image, slot].to(prediction.dtype)
    if nm or return_idxs:
        anchor = anchor[image, slot]
    if nm:
        rows = torch.cat((rows, prediction[image, 4 + nc :, anchor]), dim=1)
    sizes = counts.tolist()
    output = list(rows.split(sizes))
    if return_idxs:
        return output, list(anchor.split(sizes))
    return output
