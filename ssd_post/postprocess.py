"""Public postprocess API: the compiled ops behind the input checks of ssd_post.inputs."""

from __future__ import annotations

import types
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .config import PostprocessConfig
from .formats import Detections
from .inputs import Anchors, ImageSizes, LevelSizes
from .family import postprocess_family
from .inputs import check_level_sizes, check_score_factor, normalize_inputs


def decode_threshold_flatten(
    locs: Tensor,
    logits: Tensor,
    anchors: Anchors,
    image_sizes: ImageSizes,
    config: Optional[PostprocessConfig] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The fused first stage: activation, score threshold, per-class top-k, decode, clip.

    Args:
        locs (Tensor[B, A, 4]): box regressions (float32, float16 or bfloat16).
        logits (Tensor[B, A, C]): class logits, same dtype family.
        anchors (Tensor[A, 4], Tensor[B, A, 4] or list of B Tensor[A, 4]): xyxy anchors.
        image_sizes (Tensor[B, 2] or list of (h, w)): sizes used for clipping.
        config: thresholds and coder weights (defaults: torchvision SSD's).

    Returns:
        boxes (Tensor[N, 4] float32 xyxy), scores (Tensor[N] float32) and
        keys (Tensor[N] int64) with key = image * C + class. Candidates are grouped
        by key in increasing order, each group by decreasing score (equal scores by
        anchor index), at most ``topk_candidates`` per group.
    """
    config = config or PostprocessConfig()
    if not config.uses_fused_per_class_op:
        raise ValueError(
            "decode_threshold_flatten is SSD's per-class first stage (softmax or sigmoid, "
            "box coder, every class): use postprocess for this config"
        )
    for name, value in (("anchors", anchors), ("image_sizes", image_sizes)):
        if value is None:
            raise ValueError(f"{name} should be given to decode_threshold_flatten, got None")
    locs, logits, anchors, sizes = normalize_inputs(
        locs, logits, anchors, image_sizes, config.inverted_boxes
    )
    return ops.decode_threshold_flatten_op(
        locs,
        logits,
        anchors,
        sizes,
        config.score_thresh,
        config.topk_candidates,
        list(config.box_weights),
        config.score_activation,
        config.resolve_background_class(logits.shape[2]),
        config.clip_boxes,
    )


def postprocess(
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
    """Final detections of a batch for any single-stage detector the config
    describes: equal to torchvision's ``SSD``, ``RetinaNet`` or ``FCOS``
    ``postprocess_detections`` for ``PostprocessConfig.from_torchvision(model)``,
    and to ``reference.postprocess_loop`` for every config.

    Args:
        locs (Tensor[B, A, 4]): box regressions (float32, float16 or bfloat16;
            arithmetic in float32), or boxes with ``box_coder="none"`` (xyxy or
            cxcywh, ``config.box_format``).
        logits (Tensor[B, A, C]): class logits (probabilities with
            ``score_activation="none"``).
        anchors (Tensor[A, 4], Tensor[B, A, 4] or list of B Tensor[A, 4]): xyxy
            anchors; None (and only None) with ``box_coder="none"``.
        image_sizes (Tensor[B, 2] or list of (h, w)): per-image size for clipping;
            may be None when ``config.clip_boxes`` is False.
        config: thresholds, modes and coder (defaults: torchvision SSD's).
        level_sizes (list of ints or Tensor[L]): anchors per feature level, summing
            to A; needed by ``selection="per_level"`` only.
        score_factor (Tensor[B, A] or Tensor[B, A, 1]): per-anchor factor
            (objectness, centerness, IoU quality), logits or probabilities as
            ``config.score_factor_logits`` says; needed by ``score_factor_mode``.
        centerness: the old name of ``score_factor`` (FCOS).

    Anchors (and so boxes) are x1 <= x2, y1 <= y2; an inverted anchor decodes into
    an inverted box, which has zero area and suppresses nothing (torchvision),
    unless ``config.inverted_boxes`` says "sort" or "raise".

    Returns:
        Detections with boxes[B, K, 4], scores[B, K], labels[B, K],
        num_detections[B] and anchor_indices[B, K] (-1 in padding), zero-padded to
        K = ``config.padded_detections(A, C)`` rows per image; per image sorted by
        decreasing score.
    """
    config = config or PostprocessConfig()
    if config.box_coder == "none":
        if anchors is not None:
            raise ValueError(
                "anchors should be None with box_coder='none' (locs are boxes), got "
                f"{type(anchors).__name__}"
            )
    elif anchors is None:
        raise ValueError(f"anchors should be given for box_coder={config.box_coder!r}, got None")
    if image_sizes is None and config.clip_boxes:
        raise ValueError("image_sizes should be given when config.clip_boxes is True, got None")
    locs, logits, anchors, sizes = normalize_inputs(
        locs, logits, anchors, image_sizes, config.inverted_boxes
    )
    batch, num_anchors, num_classes = logits.shape
    factor = check_score_factor(
        score_factor, centerness, config.score_factor_mode, batch, num_anchors
    )
    if config.selection == "per_level":
        levels = check_level_sizes(level_sizes, num_anchors)
    elif level_sizes is not None:
        raise ValueError(
            f"level_sizes is only used by selection='per_level', got selection={config.selection!r}"
        )
    else:
        levels = [num_anchors]
    if not config.uses_fused_per_class_op:
        return postprocess_family(
            locs,
            logits,
            anchors,
            # Indexed on the device of locs (torch refuses CUDA indices into a CPU
            # tensor), so CPU sizes move over.
            None if sizes is None else sizes.to(locs.device),
            config,
            levels,
            factor,
        )
    if sizes is None:  # not clipping: the op's sizes are not read
        sizes = torch.zeros((batch, 2), dtype=torch.int64)
    boxes, scores, labels, counts, anchor_indices = ops.postprocess_op(
        locs,
        logits,
        anchors,
        sizes,
        config.score_thresh,
        config.nms_thresh,
        config.topk_candidates,
        config.detections_per_img,
        list(config.box_weights),
        config.score_activation,
        config.resolve_background_class(num_classes),
        config.clip_boxes,
    )
    return Detections(boxes, scores, labels, counts, anchor_indices)


def patch_torchvision_ssd(model: torch.nn.Module) -> torch.nn.Module:
    """Serves ``model.postprocess_detections`` of a torchvision SSD with ssd_post.

    The thresholds are read off the model at every call, so changing
    ``model.score_thresh`` later still takes effect. Returns the same model.
    """
    PostprocessConfig.from_torchvision(model)  # fails early on a model that is no SSD

    def postprocess_detections(self, head_outputs, image_anchors: List[Tensor], image_shapes):
        config = PostprocessConfig.from_torchvision(self)
        return postprocess(
            head_outputs["bbox_regression"],
            head_outputs["cls_logits"],
            image_anchors,
            image_shapes,
            config,
        ).to_list()

    model.postprocess_detections = types.MethodType(postprocess_detections, model)
    return model


def patch_torchvision(model: torch.nn.Module) -> torch.nn.Module:
    """Serves ``model.postprocess_detections`` of a torchvision SSD, RetinaNet or FCOS
    with ssd_post (thresholds read off the model at every call). Returns the same model.

    RetinaNet and FCOS hand their head outputs and anchors over split by feature
    level; they are concatenated back and the level sizes passed on.
    """
    from torchvision.models.detection.ssd import SSD

    PostprocessConfig.from_torchvision(model)  # fails early on an unknown model
    if isinstance(model, SSD):
        return patch_torchvision_ssd(model)

    def postprocess_detections(self, head_outputs, anchors: List[List[Tensor]], image_shapes):
        config = PostprocessConfig.from_torchvision(self)
        logits = head_outputs["cls_logits"]  # L x [B, A_l, C]
        centerness = head_outputs.get("bbox_ctrness")  # FCOS
        return postprocess(
            torch.cat(head_outputs["bbox_regression"], dim=1),
            torch.cat(logits, dim=1),
            [torch.cat(per_image) for per_image in anchors],
            image_shapes,
            config,
            level_sizes=[level.shape[1] for level in logits],
            score_factor=None if centerness is None else torch.cat(centerness, dim=1),
        ).to_list()

    model.postprocess_detections = types.MethodType(postprocess_detections, model)
    return model
