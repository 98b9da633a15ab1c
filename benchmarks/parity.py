"""Whether two Detections are the same detections.

torchvision decodes with torch's vectorised exp and ssd_post with std::exp, so a
box may move by a few float ULPs (about 1.5e-5 px at 300 px); counts, labels and
scores are compared exactly (scores to rtol 1e-6), boxes to atol 1e-3 px.

Detections of one image with exactly equal scores may come in either order:
torchvision's batched_nms sorts the survivors with an unstable sort, so the order
of a tie (say two classes at the same score) is unspecified there, while ssd_post
puts the lower class first. Such a tie is compared as a set and counted apart.
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
    tie_reordered: int = 0  # detections that differ only by the order inside an equal-score tie


def _differing(got: Detections, want: Detections) -> torch.Tensor:
    """[B, K] bool: slots (filled on either side) whose label, score or box differs, or
    anchor index where both sides have them."""
    slots = torch.arange(want.boxes.shape[1])
    filled = slots[None, :] < torch.maximum(got.num_detections, want.num_detections)[:, None]
    label_diff = got.labels != want.labels
    if got.anchor_indices is not None and want.anchor_indices is not None:
        label_diff = label_diff | (got.anchor_indices != want.anchor_indices)
    score_diff = ~torch.isclose(got.scores, want.scores, rtol=SCORE_RTOL, atol=0.0)
    box_diff = ((got.boxes - want.boxes).abs() > BOX_ATOL).any(-1)
    return (label_diff | score_diff | box_diff) & filled


def _canonical_ties(det: Detections) -> Detections:
    """The same detections, each run of equal consecutive scores ordered by (label, box,
    anchor index)."""
    boxes, scores, labels = det.boxes.clone(), det.scores.clone(), det.labels.clone()
    anchors = None if det.anchor_indices is None else det.anchor_indices.clone()
    for i in range(boxes.shape[0]):
        n = int(det.num_detections[i])
        order = torch.arange(n)
        if anchors is not None:  # least significant key first, all sorts stable
            order = order[torch.sort(det.anchor_indices[i, order], stable=True).indices]
        for column in range(3, -1, -1):
            order = order[torch.sort(det.boxes[i, order, column], stable=True).indices]
        order = order[torch.sort(det.labels[i, order], stable=True).indices]
        # Runs of equal scores keep their place: only the order inside a run changes.
        scores_i = det.scores[i, :n]
        run = torch.cat(
            (
                torch.zeros(min(n, 1), dtype=torch.long),
                torch.cumsum((scores_i[1:] != scores_i[:-1]).long(), 0),
            )
        )
        order = order[torch.sort(run[order], stable=True).indices]
        boxes[i, :n], scores[i, :n], labels[i, :n] = (
            det.boxes[i, order],
            det.scores[i, order],
            det.labels[i, order],
        )
        if anchors is not None:
            anchors[i, :n] = det.anchor_indices[i, order]
    return Detections(boxes, scores, labels, det.num_detections, anchors)


def compare(got: Detections, want: Detections) -> ParityResult:
    total = int(want.num_detections.sum())
    if got.boxes.shape != want.boxes.shape:
        return ParityResult(
            False, total, total, f"shape {tuple(got.boxes.shape)} != {tuple(want.boxes.shape)}"
        )
    count_diff = got.num_detections != want.num_detections
    as_given = int(_differing(got, want).sum())
    differing = as_given
    if as_given and not bool(count_diff.any()):
        differing = int(_differing(_canonical_ties(got), _canonical_ties(want)).sum())
    ok = differing == 0 and not bool(count_diff.any())
    message = (
        ""
        if ok
        else (
            f"{differing} of {total} detections differ; counts differ in "
            f"{int(count_diff.sum())} of {len(count_diff)} images"
        )
    )
    return ParityResult(ok, total, differing, message, tie_reordered=as_given - differing)
