"""The postprocess implementations the benchmark compares, each a function of Inputs.

Detection methods return ``ssd_post.Detections``; the two memory references
(``amax``, ``softmax``) return a tensor and are never checked for parity: they
only say how long one read of the logits (and torch's own softmax) takes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, Optional

import torch
import torchvision
from torch import Tensor

import ssd_post
from ssd_post.formats import Detections
from ssd_post.reference import torchvision_postprocess

from . import deploy
from .common import decode_clip
from .scenarios import Inputs


def run_torchvision(inp: Inputs):
    """torchvision's SSD.postprocess_detections: a Python loop over images."""
    return torchvision_postprocess(inp.locs, inp.logits, inp.anchors, inp.image_sizes, inp.config)


def run_ssd_post(inp: Inputs):
    return ssd_post.postprocess(inp.locs, inp.logits, inp.anchors, inp.image_sizes, inp.config)


def run_amax(inp: Inputs):
    return inp.logits.amax(-1)


def run_softmax(inp: Inputs):
    return inp.logits.softmax(-1)


def _decode_all(inp: Inputs) -> Tensor:
    """Every anchor's box of every image, clipped: [B, A, 4]."""
    return decode_clip(inp.locs, inp.anchors, inp.image_sizes, inp.config.box_weights)


def _per_image_top(
    boxes: Tensor,
    scores: Tensor,
    keys: Tensor,
    keep: Tensor,
    num_classes: int,
    batch: int,
    detections_per_img: int,
) -> Detections:
    """Pads the survivors ``keep`` (by decreasing score) into Detections, keeping the
    ``detections_per_img`` best of each image."""
    image = keys[keep] // num_classes
    # A stable sort by image keeps each image's survivors in score order.
    keep = keep[torch.sort(image, stable=True).indices]
    image = keys[keep] // num_classes
    counts = torch.bincount(image, minlength=batch)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - first[image]
    chosen = rank < detections_per_img
    keep, image, rank = keep[chosen], image[chosen], rank[chosen]
    out = Detections(
        boxes.new_zeros((batch, detections_per_img, 4)),
        scores.new_zeros((batch, detections_per_img)),
        torch.zeros((batch, detections_per_img), dtype=torch.int64, device=boxes.device),
        counts.clamp(max=detections_per_img),
    )
    out.boxes[image, rank] = boxes[keep]
    out.scores[image, rank] = scores[keep]
    out.labels[image, rank] = keys[keep] % num_classes
    return out


def _flatten_and_nms(inp: Inputs, per_class_topk: bool) -> Detections:
    """The whole batch as one torchvision.ops.batched_nms call, key = image * C + class."""
    cfg = inp.config
    batch, num_anchors, num_classes = inp.logits.shape
    scores = inp.logits.float().softmax(-1)  # [B, A, C]
    scores[..., cfg.background_class] = 0.0  # never above score_thresh >= 0
    if per_class_topk:
        k = min(cfg.topk_candidates, num_anchors)
        top = scores.transpose(1, 2).topk(k, dim=-1)  # [B, C, k]
        passed = top.values > cfg.score_thresh
        image, label, slot = torch.nonzero(passed, as_tuple=True)
        anchor = top.indices[image, label, slot]
        cand_scores = top.values[image, label, slot]
    else:
        image, anchor, label = torch.nonzero(scores > cfg.score_thresh, as_tuple=True)
        cand_scores = scores[image, anchor, label]
    cand_boxes = _decode_all(inp)[image, anchor]
    keys = image * num_classes + label
    keep = torchvision.ops.batched_nms(cand_boxes, cand_scores, keys, cfg.nms_thresh)
    return _per_image_top(
        cand_boxes, cand_scores, keys, keep, num_classes, batch, cfg.detections_per_img
    )


def run_flatten_nms(inp: Inputs):
    return _flatten_and_nms(inp, per_class_topk=False)


def run_flatten_topk_nms(inp: Inputs):
    return _flatten_and_nms(inp, per_class_topk=True)


# name -> (function, produces detections)
METHODS: Dict[str, Callable[[Inputs], object]] = {
    "torchvision": run_torchvision,
    "flatten_nms": run_flatten_nms,
    "flatten_topk_nms": run_flatten_topk_nms,
    "ssd_post": run_ssd_post,
    "amax": run_amax,
    "softmax": run_softmax,
}
REFERENCES = ("amax", "softmax")
# The deployment peers (benchmarks.deploy) join when their runtime is installed;
# PREPARE exports and loads them before the first, timed, call.
PREPARE: Dict[str, Callable[[Inputs], object]] = {}
for _name in deploy.available_runtimes():
    METHODS[_name] = deploy.PEERS[_name][0]
    PREPARE[_name] = lambda inp, name=_name: deploy.prepare(inp, name)


def parity_oracle(method: str, inp: Inputs) -> Optional[Detections]:
    """What ``method`` must return, or None for the memory references.

    flatten_nms has no per-class top-k by design, so its oracle is torchvision's loop
    with topk_candidates = A (every candidate goes to NMS).
    """
    if method in REFERENCES:
        return None
    if method == "flatten_nms":
        no_topk = replace(inp, config=replace(inp.config, topk_candidates=inp.logits.shape[1]))
        return run_torchvision(no_topk)
    return run_torchvision(inp)
