"""Whether two Detections are the same detections.

torchvision decodes with torch's vectorised exp and ssd_post with std::exp, so a
box may move by a few float ULPs (about 1.5e-5 px at 300 px); counts, labels and
scores are compared exactly (scores to rtol 1e-6), boxes to atol 1e-3 px.

Detections of one image with exactly equal scores may come in either order:
torchvision's batched_nms sorts the survivors with an unstable sort, so the order
of a tie (say two classes at the same score) is unspecified there, while ssd_post
puts the lower class first. Such a tie is compared as a set and counted apart.

An exported graph rounds exp and sigmoid its own way: a score may move by an ULP,
which splits an exact tie or swaps two scores an ULP apart (dense RetinaNet logits
have many: sigmoid near 1 is coarse). ``compare(..., near_ties=True)`` also compares
each run of scores within SCORE_RTOL of the next as a set, counted apart again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

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
    # ... and, with near_ties=True, only by the order inside a run of scores within
    # SCORE_RTOL of each other (a runtime's ULP of rounding)
    near_tie_reordered: int = 0


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


def _runs(det: Detections, rtol: float = 0.0) -> Tensor:
    """[B, K] run ids: a run is a stretch of consecutive scores of one image, each within
    ``rtol`` (relative) of the one before (``rtol=0``: exactly equal)."""
    scores = det.scores
    gap = (scores[:, :-1] - scores[:, 1:]).abs() > rtol * scores[:, :-1].abs()
    first = torch.zeros(scores.shape[0], min(scores.shape[1], 1), dtype=torch.long)
    return torch.cat((first, torch.cumsum(gap.long(), 1)), dim=1)


def _canonical_ties(det: Detections, runs: Optional[Tensor] = None) -> Detections:
    """The same detections, each run of ``runs`` (default: of exactly equal consecutive
    scores) ordered by (label, box, anchor index)."""
    runs = _runs(det) if runs is None else runs
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
        # Runs keep their place: only the order inside a run changes.
        order = order[torch.sort(runs[i, :n][order], stable=True).indices]
        boxes[i, :n], scores[i, :n], labels[i, :n] = (
            det.boxes[i, order],
            det.scores[i, order],
            det.labels[i, order],
        )
        if anchors is not None:
            anchors[i, :n] = det.anchor_indices[i, order]
    return Detections(boxes, scores, labels, det.num_detections, anchors)


def compare(got: Detections, want: Detections, near_ties: bool = False) -> ParityResult:
    """Whether ``got`` gives ``want``'s detections; exact score ties compared as sets,
    and with ``near_ties`` also runs of ``want``'s scores within SCORE_RTOL of each
    other (for a runtime that rounds exp and sigmoid its own way, see the module
    docstring)."""
    total = int(want.num_detections.sum())
    if got.boxes.shape != want.boxes.shape:
        return ParityResult(
            False, total, total, f"shape {tuple(got.boxes.shape)} != {tuple(want.boxes.shape)}"
        )
    count_diff = got.num_detections != want.num_detections
    as_given = int(_differing(got, want).sum())
    differing = exact_ties = as_given
    if as_given and not bool(count_diff.any()):
        differing = exact_ties = int(_differing(_canonical_ties(got), _canonical_ties(want)).sum())
    if differing and near_ties and not bool(count_diff.any()):
        runs = _runs(want, SCORE_RTOL)
        near = int(_differing(_canonical_ties(got, runs), _canonical_ties(want, runs)).sum())
        differing = min(differing, near)
    ok = differing == 0 and not bool(count_diff.any())
    message = (
        ""
        if ok
        else (
            f"{differing} of {total} detections differ; counts differ in "
            f"{int(count_diff.sum())} of {len(count_diff)} images"
        )
    )
    return ParityResult(
        ok,
        total,
        differing,
        message,
        tie_reordered=as_given - exact_ties,
        near_tie_reordered=exact_ties - differing,
    )


def detections_from_rows(rows: Sequence[Tensor], indices: Sequence[Tensor], k: int) -> Detections:
    """``non_max_suppression``'s per-image rows [n, 6 (+ nm)] (x1, y1, x2, y2, score,
    label) and anchor indices [n] as Detections padded to ``k`` rows, the layout of
    the exported YOLO graph (wider when an image has more than ``k`` rows, which
    :func:`compare` then reports as a shape mismatch)."""
    batch, width = len(rows), max([k] + [r.shape[0] for r in rows])
    out = Detections(
        torch.zeros(batch, width, 4),
        torch.zeros(batch, width),
        torch.zeros(batch, width, dtype=torch.int64),
        torch.tensor([r.shape[0] for r in rows], dtype=torch.int64),
        torch.full((batch, width), -1, dtype=torch.int64),
    )
    for i, (r, index) in enumerate(zip(rows, indices)):
        n = r.shape[0]
        out.boxes[i, :n] = r[:, :4]
        out.scores[i, :n] = r[:, 4]
        out.labels[i, :n] = r[:, 5].long()
        out.anchor_indices[i, :n] = index.flatten()
    return out
