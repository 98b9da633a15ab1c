"""COCO mAP of ssd_post detections through pycocotools."""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Sequence

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from ssd_post import Detections, to_coco_results

STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def results_for_batch(
    detections: Detections,
    targets: Sequence[dict],
    input_size: Sequence[int],
    label_to_category: Dict[int, int],
) -> List[dict]:
    """COCO results of a batch, boxes mapped from network-input pixels to file pixels.

    Args:
        detections: B images, boxes in input pixels of size ``input_size`` (h, w).
        targets: per image ``image_id`` and ``orig_size`` (h, w).
    """
    height, width = int(input_size[0]), int(input_size[1])
    scale = torch.tensor([[t["orig_size"][1] / width, t["orig_size"][0] / height] for t in targets])
    return to_coco_results(detections, [t["image_id"] for t in targets], label_to_category, scale)


def coco_map(coco_gt: COCO, results: List[dict], image_ids: Sequence[int] = ()) -> Dict[str, float]:
    """pycocotools bbox evaluation; returns the 12 summary numbers by name.

    An empty ``results`` (an untrained model) scores 0 instead of raising, as
    ``COCO.loadRes`` would.
    """
    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids:
            evaluator.params.imgIds = sorted(set(int(i) for i in image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(max(value, 0.0)) for name, value in zip(STAT_NAMES, evaluator.stats)}
