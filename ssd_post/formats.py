"""Detections: padded batch tensors, torchvision-style dicts and COCO results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class Detections:
    """Detections of a batch, zero-padded to K rows per image.

    From :func:`ssd_post.postprocess`, K = ``config.padded_detections(A, C)``:
    min(detections_per_img, C_fg * min(topk_candidates, A)) (``per_level``:
    min(detections_per_img, C_fg * A)), so never more rows than an image can fill.
    From :meth:`from_list`, K = its ``detections_per_img`` argument.

    Attributes:
        boxes (Tensor[B, K, 4]): xyxy float32; rows past ``num_detections`` are zero.
        scores (Tensor[B, K]): float32, decreasing along K.
        labels (Tensor[B, K]): int64 class column of the logits.
        num_detections (Tensor[B]): int64, valid rows per image.
        anchor_indices (Tensor[B, K], optional): int64 anchor row (index into A) of
            each detection, -1 in padding rows.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    num_detections: Tensor
    anchor_indices: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device) -> "Detections":
        anchors = self.anchor_indices
        return Detections(
            *(t.to(device) for t in (self.boxes, self.scores, self.labels, self.num_detections)),
            anchor_indices=None if anchors is None else anchors.to(device),
        )

    def to_list(self) -> List[Dict[str, Tensor]]:
        """torchvision's format: one dict of ``boxes[n, 4]``, ``scores[n]``, ``labels[n]``
        per image."""
        counts = self.num_detections.tolist()
        return [
            {"boxes": self.boxes[i, :n], "scores": self.scores[i, :n], "labels": self.labels[i, :n]}
            for i, n in enumerate(counts)
        ]

    @classmethod
    def from_list(
        cls, detections: Sequence[Dict[str, Tensor]], detections_per_img: int
    ) -> "Detections":
        """Pads torchvision-style dicts into a Detections of K = ``detections_per_img``
        rows (longer lists are cut to their first ``detections_per_img``)."""
        batch = len(detections)
        device = detections[0]["boxes"].device if batch else torch.device("cpu")
        out = cls(
            boxes=torch.zeros(batch, detections_per_img, 4, device=device),
            scores=torch.zeros(batch, detections_per_img, device=device),
            labels=torch.zeros(batch, detections_per_img, dtype=torch.int64, device=device),
            num_detections=torch.zeros(batch, dtype=torch.int64, device=device),
        )
        for i, det in enumerate(detections):
            n = min(int(det["scores"].numel()), detections_per_img)
            out.boxes[i, :n] = det["boxes"][:n].float()
            out.scores[i, :n] = det["scores"][:n].float()
            out.labels[i, :n] = det["labels"][:n].long()
            out.num_detections[i] = n
        return out


def to_coco_results(
    detections: Detections,
    image_ids: Sequence[int],
    label_to_category: Optional[Dict[int, int]] = None,
    scale_xy: Optional[Tensor] = None,
) -> List[dict]:
    """COCO results entries (``image_id``, ``category_id``, ``bbox`` as xywh, ``score``).

    Args:
        detections: B images of detections.
        image_ids: COCO image id of each of the B images.
        label_to_category: maps a label to a COCO category id (identity when None).
        scale_xy (Tensor[B, 2], optional): (sx, sy) per image, multiplied into the
            boxes, to map network-input pixels back to original image pixels.
    """
    if len(image_ids) != len(detections):
        raise ValueError(
            f"image_ids should have one id per image ({len(detections)}), got {len(image_ids)}"
        )
    results = []
    for i, det in enumerate(detections.to("cpu").to_list()):
        boxes = det["boxes"].clone()
        if scale_xy is not None:
            boxes[:, 0::2] *= float(scale_xy[i, 0])
            boxes[:, 1::2] *= float(scale_xy[i, 1])
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1)
        for box, score, label in zip(xywh.tolist(), det["scores"].tolist(), det["labels"].tolist()):
            category = label if label_to_category is None else label_to_category[label]
            results.append(
                {
                    "image_id": int(image_ids[i]),
                    "category_id": int(category),
                    "bbox": [round(v, 3) for v in box],
                    "score": round(float(score), 5),
                }
            )
    return results


def write_coco_results(results: Iterable[dict], path: str) -> None:
    """Writes COCO results entries as a json list that ``COCO.loadRes`` reads."""
    with open(path, "w") as f:
        json.dump(list(results), f)
