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
from .inputs import check_centerness, check_level_sizes, normalize_inputs
from .per_level import postprocess_per_level


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
    anchors: Anchors,
    image_sizes: ImageSizes,
    config: Optional[PostprocessConfig] = None,
    *,
    level_sizes: Optional[LevelSizes] = None,
    centerness: Optional[Tensor] = None,
) -> Detections:
    """Final detections of a batch, equal to torchvision's ``SSD``, ``RetinaNet`` or
    ``FCOS`` ``postprocess_detections`` (as ``config.selection`` / ``score_activation``
    / ``box_coder`` say).

    Args:
        locs (Tensor[B, A, 4]): box regressions (float32, float16 or bfloat16;
            arithmetic in float32).
        logits (Tensor[B, A, C]): class logits.
        anchors (Tensor[A, 4], Tensor[B, A, 4] or list of B Tensor[A, 4]): xyxy anchors.
        image_sizes (Tensor[B, 2] or list of (h, w)): per-image size for clipping.
        config: thresholds and coder weights (defaults: torchvision SSD's).
        level_sizes (list of ints or Tensor[L]): anchors per feature level, summing
            to A; needed by ``selection="per_level"`` only.
        centerness (Tensor[B, A] or Tensor[B, A, 1]): centerness logits; needed by
            ``score_activation="sigmoid_centerness"`` only.

    Anchors (and so boxes) are x1 <= x2, y1 <= y2; an inverted anchor decodes into
    an inverted box, which has zero area and suppresses nothing (torchvision),
    unless ``config.inverted_boxes`` says "sort" or "raise".

    Returns:
        Detections with boxes[B, K, 4], scores[B, K], labels[B, K] and
        num_detections[B], zero-padded to K = ``config.padded_detections(A, C)`` =
        min(detections_per_img, C_fg * min(topk_candidates, A)) rows per image;
        per image sorted by decreasing score (equal scores by class, then rank in
        the class).
    """
    config = config or PostprocessConfig()
    locs, logits, anchors, sizes = normalize_inputs(
        locs, logits, anchors, image_sizes, config.inverted_boxes
    )
    batch, num_anchors, num_classes = logits.shape
    centerness = check_centerness(centerness, config.score_activation, batch, num_anchors)
    if config.selection == "per_level":
        return postprocess_per_level(
            locs,
            logits,
            anchors,
            # Indexed by the selected images, which live on the device of locs (torch
            # refuses CUDA indices into a CPU tensor), so CPU sizes move over.
            sizes.to(locs.device),
            config,
            check_level_sizes(level_sizes, num_anchors),
            centerness,
        )
    if level_sizes is not None:
        raise ValueError(
            "level_sizes is only used by selection='per_level', got selection='per_class'"
        )
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
        centerness = head_outputs.get("bbox_ctrness")
        return postprocess(
            torch.cat(head_outputs["bbox_regression"], dim=1),
            torch.cat(logits, dim=1),
            [torch.cat(per_image) for per_image in anchors],
            image_shapes,
            config,
            level_sizes=[level.shape[1] for level in logits],
            centerness=None if centerness is None else torch.cat(centerness, dim=1),
        ).to_list()

    model.postprocess_detections = types.MethodType(postprocess_detections, model)
    return model
