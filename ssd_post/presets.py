"""Named postprocess configurations of the detectors users port from other toolkits.

    config = ssd_post.PostprocessConfig.from_preset("yolov8", score_thresh=0.001)

Each preset follows one file of its toolkit (cited in its docstring) for every
choice that changes which detections come out: activation, score factor, where the
threshold sits, the candidate cap, the box coder, the NMS grouping and the caps.
Keyword overrides replace fields (thresholds, caps) and are checked as any config.

What no preset changes: ssd_post's NMS is exact per group on the true coordinates
and ranks equal scores by a fixed rule; mmcv and ultralytics offset the coordinates
of each class (float rounding near the IoU threshold) and sort unstably, so a few
detections at those edges can differ (README, "Which configuration for my detector").

The tensors each preset expects (``postprocess(locs, logits, anchors, image_sizes,
config, level_sizes=..., score_factor=...)``):

- ``mmdet_atss``: class logits, centerness logits as ``score_factor``, deltas and
  anchors as for RetinaNet, ``level_sizes``.
- ``mmdet_rtmdet``: class logits; ``locs`` the (l, t, r, b) distances in units of the
  stride (the head's output before its ``* stride``) and ``anchors`` squares of side
  stride centred on the prior points; ``level_sizes``.
- ``efficientdet``: class logits, deltas in (dx, dy, dw, dh) order (effdet's are
  (dy, dx, dh, dw): ``locs[..., [1, 0, 3, 2]]``) and xyxy anchors.
- ``yolov5``, ``yolox``: from the output [B, N, 5 + nc]: ``locs = out[..., :4]``
  (cx, cy, w, h), ``score_factor = out[..., 4]``, ``logits = out[..., 5:]``.
- ``yolov8``: from the output [B, 4 + nc, N]: ``locs = out[:, :4].mT``,
  ``logits = out[:, 4:].mT`` (or use ``ssd_post.non_max_suppression``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List

import torch

from .config import PostprocessConfig

# No cap: select_topk and the padded outputs are sized by the data (min(cap, A)),
# never by this number.
NO_CAP = 2**31 - 1


def at_least(threshold: float) -> float:
    """The strict threshold t' with ``p > t'`` exactly when ``p >= threshold`` for
    every float32 p: the float32 just below float32(threshold). For toolkits whose
    test is ``>=`` (YOLOX), as ssd_post's is ``>``."""
    below = torch.nextafter(
        torch.tensor(threshold, dtype=torch.float32), torch.tensor(float("-inf"))
    )
    return float(below.clamp(min=0.0))


def mmdet_atss() -> PostprocessConfig:
    """mmdet ATSS (``configs/atss/atss_r50_fpn_1x_coco.py``, ``ATSSHead`` through
    ``BaseDenseHead._predict_by_feat_single``): sigmoid classes; per level the
    pairs with p > 0.05, the best 1000 (``nms_pre``); the centerness (sigmoid) then
    multiplies the score (``_bbox_post_process``), NMS per class at IoU 0.6, 100
    per image. ``DeltaXYWHBBoxCoder`` with stds (0.1, 0.1, 0.2, 0.2) is the box coder
    with weights (10, 10, 5, 5) and the same clamp (log(1000 / 16)); its op order
    differs from torchvision's, so boxes can differ in the last bits."""
    return PostprocessConfig(
        score_thresh=0.05,
        nms_thresh=0.6,
        topk_candidates=1000,
        detections_per_img=100,
        box_weights=(10.0, 10.0, 5.0, 5.0),
        score_activation="sigmoid",
        score_factor_mode="after_selection",
        background_class=None,
        selection="per_level",
    )


def mmdet_rtmdet() -> PostprocessConfig:
    """mmdet RTMDet (``configs/rtmdet/rtmdet_l_8xb32-300e_coco.py``,
    ``RTMDetHead`` with ``DistancePointBBoxCoder``): sigmoid classes, no factor
    (``with_objectness=False``); per level the pairs with p > 0.001, the best 30000
    (``nms_pre``); NMS per class at IoU 0.65, 300 per image. The distance decode is
    the linear coder on stride-sized squares (module docstring)."""
    return PostprocessConfig(
        score_thresh=0.001,
        nms_thresh=0.65,
        topk_candidates=30000,
        detections_per_img=300,
        score_activation="sigmoid",
        background_class=None,
        selection="per_level",
        box_coder="linear",
    )


def efficientdet() -> PostprocessConfig:
    """EfficientDet as rwightman's effdet runs it (``effdet/bench.py``
    ``_post_process``, ``effdet/anchors.py`` ``generate_detections``), after
    google/automl ``efficientdet/keras/postprocess.py``: the 5000 best anchor x
    class pairs of each image (``MAX_DETECTION_POINTS``) with no threshold before
    the cap, sigmoid scores, NMS per class at IoU 0.5, 100 per image. Its decode
    is the box coder with weights (1, 1, 1, 1) but without the clamp of dw, dh at
    log(1000 / 16): boxes more than 62x their anchor differ. ``score_thresh=0`` is
    the strict test p > 0, which only a sigmoid that underflows (logit < -103)
    fails."""
    return PostprocessConfig(
        score_thresh=0.0,
        nms_thresh=0.5,
        topk_candidates=5000,
        detections_per_img=100,
        box_weights=(1.0, 1.0, 1.0, 1.0),
        score_activation="sigmoid",
        background_class=None,
        selection="per_image",
    )


def yolo_family_config(**fields) -> PostprocessConfig:
    """The fields every YOLO preset shares: probabilities given, decoded (cx, cy, w,
    h) boxes, no background column, no clipping (the toolkits clip when they scale
    the boxes back to the image), one candidate list per image, the best class of
    each anchor unless ``fields`` say ``label_mode="multi"``."""
    return PostprocessConfig(
        score_activation="none",
        background_class=None,
        clip_boxes=False,
        selection="per_image",
        box_coder="none",
        box_format="cxcywh",
        **{"label_mode": "single", **fields},
    )


def yolov5() -> PostprocessConfig:
    """YOLOv5 (``utils/general.py`` ``non_max_suppression`` of ultralytics/yolov5,
    defaults of ``detect.py``): conf = objectness x class probability, the
    anchor's best class if conf > 0.25 (its objectness pre-filter ``obj > conf``
    removes nothing more, as conf <= obj), the 30000 best (``max_nms``), NMS per
    class at IoU 0.45, 300 per image. ``label_mode="multi"`` is its
    ``multi_label=True`` (validation)."""
    return yolo_family_config(
        score_thresh=0.25,
        nms_thresh=0.45,
        topk_candidates=30000,
        detections_per_img=300,
        score_factor_mode="before_threshold",
        score_factor_logits=False,
    )


def yolox() -> PostprocessConfig:
    """YOLOX (``yolox/utils/boxes.py`` ``postprocess`` of Megvii-BaseDetection/YOLOX,
    ``test_conf=0.01`` and ``nmsthre=0.65`` of ``yolox/exp/yolox_base.py``): each
    anchor's best class, kept when objectness x its probability >= 0.01 (``>=``:
    the threshold is ``at_least(0.01)``), NMS per class at IoU 0.65, no candidate
    cap and no cap on the detections. YOLOX picks the best class by probability
    before multiplying; ssd_post by the product, which can only differ when two
    products round to the same float."""
    return yolo_family_config(
        score_thresh=at_least(0.01),
        nms_thresh=0.65,
        topk_candidates=NO_CAP,
        detections_per_img=NO_CAP,
        score_factor_mode="before_threshold",
        score_factor_logits=False,
    )


def yolov8() -> PostprocessConfig:
    """YOLOv8 / YOLO11 (``ultralytics/utils/nms.py`` ``non_max_suppression``, with
    the predictor's defaults conf 0.25, iou 0.7): the anchor's best class if its
    probability > 0.25, the 30000 best (``max_nms``), NMS per class at IoU 0.7, 300
    per image. Validation is ``score_thresh=0.001, label_mode="multi"``."""
    return yolo_family_config(
        score_thresh=0.25, nms_thresh=0.7, topk_candidates=30000, detections_per_img=300
    )


PRESETS: Dict[str, Callable[[], PostprocessConfig]] = {
    "mmdet_atss": mmdet_atss,
    "mmdet_rtmdet": mmdet_rtmdet,
    "efficientdet": efficientdet,
    "yolov5": yolov5,
    "yolox": yolox,
    "yolov8": yolov8,
}


def preset_names() -> List[str]:
    """The names ``PostprocessConfig.from_preset`` takes."""
    return sorted(PRESETS)


def from_preset(name: str, **overrides) -> PostprocessConfig:
    """The preset ``name`` with ``overrides`` replacing its fields (checked as any
    config); a ValueError names an unknown preset or field."""
    if name not in PRESETS:
        raise ValueError(f"preset should be one of {preset_names()}, got {name!r}")
    fields = {f.name for f in dataclasses.fields(PostprocessConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"overrides should be PostprocessConfig fields, got {unknown}")
    return dataclasses.replace(PRESETS[name](), **overrides)
