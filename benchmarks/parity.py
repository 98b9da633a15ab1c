"""Whether two Detections are the same detections.

torchvision decodes with torch's vectorised exp and ssd_post with std::exp, so a
box may move by a few float ULPs (about 1.5e-5 px at 300 px); counts, labels and
scores are compared exactly (scores to rtol 1e-6), boxes to atol 1e-3 px.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ssd_post.formats import Detections

BOX_ATOL = 1e-3
SCORE_RTOL = 1e-6


@dataclass
class ParityResult:
    ok: bool
    detections: int  # detections in the oracle
    differing: int  # detections (by position) whose label, score or box differs
    message: str = ""


def compare(got: Detections, want: Detections) -> ParityResult:
    total = int(want.num_detections.sum())
    if got.boxes.shape != want.boxes.shape:
        return ParityResult(False, total, total, f"shape {tuple(got.boxes.shape)} != {tuple(want.boxes.shape)}")
    count_diff = got.num_detections != want.num_detections
    # Compare position by position over the slots either side fills.
    slots = torch.arange(want.boxes.shape[1])
    filled = slots[None, :] < torch.maximum(got.num_detections, want.num_detections)[:, None]
    label_diff = got.labels != want.labels
    score_diff = ~torch.isclose(got.scores, want.scores, rtol=SCORE_RTOL, atol=0.0)
    box_diff = ((got.boxes - want.boxes).abs() > BOX_ATOL).any(-1)
    differing = int(((label_diff | score_diff | box_diff) & filled).sum())
    ok = differing == 0 and not bool(count_diff.any())
    message = "" if ok else (
        f"{differing} of {total} detections differ; counts differ in "
        f"{int(count_diff.sum())} of {len(count_diff)} images")
    return ParityResult(ok, total, differing, message)
