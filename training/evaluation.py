"""COCO evaluation of a detector: per-stage timing, COCOeval metrics, pictures.

The pieces ``evaluate.py`` is made of, each usable on its own:

    timer = StageTimer()
    with timer.stage("forward"):
        locs, logits = detector(images)                    # [B, A, 4], [B, A, C]
    results = detections_to_coco(detections, targets, input_size, label_to_category)
    metrics = coco_evaluate(coco_gt, results, image_ids)   # 12 COCO numbers + named keys

Detections come out of the network in network-input pixels (the resized image the
model saw); :func:`detections_to_coco` maps them back to original-image pixels with
each target's ``orig_size`` before COCOeval compares them with the annotations.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from models.detector import PostprocessFn
from ssd_post import Detections, to_coco_results

# The order of COCOeval.stats, named the way COCOeval.summarize prints them.
COCO_STAT_NAMES: Tuple[str, ...] = (
    "AP @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AP @[IoU=0.50      | area=   all | maxDets=100]",
    "AP @[IoU=0.75      | area=   all | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AP @[IoU=0.50:0.95 | area= large | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets=  1]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets= 10]",
    "AR @[IoU=0.50:0.95 | area=   all | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area= small | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "AR @[IoU=0.50:0.95 | area= large | maxDets=100]",
)
# Metric key -> index into COCOeval.stats.
METRIC_KEYS: Dict[str, int] = {
    "map": 0,
    "map_50": 1,
    "map_75": 2,
    "map_small": 3,
    "map_medium": 4,
    "map_large": 5,
    "mar_1": 6,
    "mar_10": 7,
    "mar_100": 8,
    "mar_small": 9,
    "mar_medium": 10,
    "mar_large": 11,
}
STAGES: Tuple[str, ...] = ("data", "forward", "postprocess", "evaluation")


class StageTimer:
    """Wall-clock seconds spent in each named stage, summed over calls.

    Stages are timed with ``time.perf_counter``; on CPU every op has finished when
    it returns, so no synchronisation is needed for the numbers to be honest.
    """

    def __init__(self, stages: Sequence[str] = STAGES) -> None:
        self.seconds: Dict[str, float] = {name: 0.0 for name in stages}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Adds the time spent inside the ``with`` block to stage ``name``."""
        if name not in self.seconds:
            raise ValueError(f"unknown stage {name!r}; expected one of {list(self.seconds)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        """Adds ``seconds`` measured elsewhere (e.g. between two Lightning hooks)."""
        if name not in self.seconds:
            raise ValueError(f"unknown stage {name!r}; expected one of {list(self.seconds)}")
        self.seconds[name] += float(seconds)

    def summary(self, num_images: int) -> Dict[str, Dict[str, float]]:
        """``{"timing_ms": {stage: total ms}, "timing_ms_per_image": {stage: ms / image}}``."""
        per_image = max(int(num_images), 1)  # an empty run reports totals, not a division by zero
        return {
            "timing_ms": {name: 1000.0 * s for name, s in self.seconds.items()},
            "timing_ms_per_image": {
                name: 1000.0 * s / per_image for name, s in self.seconds.items()
            },
        }


def max_over_ranks(per_rank_seconds: Sequence[Mapping[str, float]]) -> Dict[str, float]:
    """Per stage, the slowest rank: ranks run side by side, so the slowest one is the
    wall-clock time that stage added to the run."""
    if not per_rank_seconds:
        raise ValueError("per_rank_seconds should hold one dict per rank, got none")
    return {name: max(rank[name] for rank in per_rank_seconds) for name in per_rank_seconds[0]}


def scale_to_original(orig_sizes: Tensor, input_size: Tuple[int, int]) -> Tensor:
    """Per-image factors that map network-input pixels back to original-image pixels.

    Args:
        orig_sizes (Tensor[B, 2]): (height, width) of each original image.
        input_size: (height, width) the images were resized to for the network.

    Returns:
        Tensor[B, 2] float32 of (sx, sy) = (orig_w / input_w, orig_h / input_h), the
        ``scale_xy`` that :func:`ssd_post.to_coco_results` multiplies into x and y.
    """
    orig_sizes = torch.as_tensor(orig_sizes, dtype=torch.float32).reshape(-1, 2)
    input_h, input_w = (float(v) for v in input_size)
    if input_h <= 0 or input_w <= 0:
        raise ValueError(
            f"input_size should be a positive (height, width), got {tuple(input_size)}"
        )
    return torch.stack((orig_sizes[:, 1] / input_w, orig_sizes[:, 0] / input_h), dim=1)


def detections_to_coco(
    detections: Detections,
    targets: Sequence[Mapping[str, object]],
    input_size: Tuple[int, int],
    label_to_category: Optional[Mapping[int, int]] = None,
) -> List[dict]:
    """COCO results entries for one batch, boxes in original-image pixels.

    Args:
        detections: B images, boxes (Tensor[B, K, 4]) in network-input pixels.
        targets: B dicts with ``image_id`` (int or 0-d Tensor) and ``orig_size``
            ((h, w) as Tensor[2] or pair).
        input_size: (height, width) of the network input.
        label_to_category: model label (1..K) -> COCO category id; identity if None.
    """
    if len(targets) != len(detections):
        raise ValueError(
            f"targets should have one entry per image ({len(detections)}), got {len(targets)}"
        )
    image_ids = [int(t["image_id"]) for t in targets]
    orig_sizes = (
        torch.stack([torch.as_tensor(t["orig_size"], dtype=torch.float32) for t in targets])
        if targets
        else torch.zeros(0, 2)
    )
    scale_xy = scale_to_original(orig_sizes, input_size)
    return to_coco_results(
        detections, image_ids, dict(label_to_category) if label_to_category else None, scale_xy
    )


def detections_by_image(
    detections: Detections,
    targets: Sequence[Mapping[str, object]],
    input_size: Tuple[int, int],
    label_to_category: Optional[Mapping[int, int]] = None,
) -> Dict[int, List[dict]]:
    """:func:`detections_to_coco` grouped by image: image id -> that image's COCO
    results entries, every image of the batch a key (one without detections maps to
    an empty list, so it still counts as evaluated). What :func:`merge_rank_results`
    joins across ranks."""
    per_image: Dict[int, List[dict]] = {int(t["image_id"]): [] for t in targets}
    for entry in detections_to_coco(detections, targets, input_size, label_to_category):
        per_image[entry["image_id"]].append(entry)
    return per_image


def merge_rank_results(
    per_rank: Sequence[Mapping[int, List[dict]]],
) -> Tuple[List[dict], List[int]]:
    """Joins the detections of several ranks, each image once.

    Args:
        per_rank: per rank, image id -> that image's COCO results entries (an image
            with no detection maps to an empty list, so it still counts as evaluated).

    Returns:
        (results ordered by image id, sorted image ids). A sampler that pads its last
        shard by repeating images makes two ranks report the same image; the
        detections are the same, and the first rank's copy is kept.
    """
    merged: Dict[int, List[dict]] = {}
    for rank_results in per_rank:
        for image_id, entries in rank_results.items():
            merged.setdefault(int(image_id), list(entries))
    image_ids = sorted(merged)
    return [entry for image_id in image_ids for entry in merged[image_id]], image_ids


def _empty_results(coco_gt) -> object:
    """A results COCO with no detections: ``COCO.loadRes`` cannot take an empty list."""
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def coco_evaluate(coco_gt, results: Sequence[dict], image_ids: Sequence[int]) -> Dict[str, object]:
    """Runs pycocotools' COCOeval (bbox) on ``results`` over ``image_ids`` only.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` of the ground truth.
        results: COCO results entries (``image_id``, ``category_id``, ``bbox`` xywh,
            ``score``), original-image pixels. Not modified.
        image_ids: the images that were evaluated; images of the annotation file that
            are not in it (a subset run) do not count as misses.

    Returns:
        ``{"stats": [12 floats], "summary": COCOeval's printed table, "map": ...,
        "map_50": ..., ...}`` with every key of :data:`METRIC_KEYS`.
    """
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(set(int(i) for i in image_ids))
    if not image_ids:
        raise ValueError("image_ids is empty: no image was evaluated")
    unknown = set(image_ids) - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"image_ids not in the annotation file: {sorted(unknown)[:5]}")
    # loadRes adds keys (area, id, segmentation) to the dicts it is given; copy them
    # so the caller's results stay plain COCO results entries.
    results = [dict(entry) for entry in results]
    noise = io.StringIO()  # pycocotools prints progress lines; only the table is wanted
    with contextlib.redirect_stdout(noise):
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats]
    metrics: Dict[str, object] = {"stats": stats, "summary": table.getvalue().rstrip("\n")}
    metrics.update({key: stats[index] for key, index in METRIC_KEYS.items()})
    return metrics


# Distinct, saturated colours so neighbouring boxes of different classes stand apart.
_PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def draw_detections(
    image,
    results: Sequence[dict],
    category_names: Mapping[int, str],
    score_min: float = 0.3,
    ground_truth: Optional[Sequence[dict]] = None,
):
    """A copy of ``image`` with its detections drawn: box, class name and score.

    Args:
        image: ``PIL.Image`` in original pixels.
        results: COCO results entries of this image (``bbox`` xywh, original pixels).
        category_names: COCO category id -> name.
        score_min: detections scoring below this are not drawn (the postprocess keeps
            scores down to 0.01, which would bury the picture).
        ground_truth: COCO annotations of this image, drawn as thin white boxes so a
            reader can tell misses from false positives.

    Returns:
        ``PIL.Image`` (RGB).
    """
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for ann in ground_truth or ():
        x, y, w, h = ann["bbox"]
        draw.rectangle((x, y, x + w, y + h), outline=(255, 255, 255), width=1)
    # Lowest score first, so the most confident box and label end up on top.
    for entry in sorted(results, key=lambda e: e["score"]):
        if entry["score"] < score_min:
            continue
        x, y, w, h = entry["bbox"]
        category = int(entry["category_id"])
        colour = _PALETTE[category % len(_PALETTE)]
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=2)
        label = f"{category_names.get(category, str(category))} {entry['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), label, font=font)
        # Label above the box when there is room, else just inside its top edge.
        shift = bottom - top + 2 if y - (bottom - top + 2) >= 0 else 0
        draw.rectangle((left, top - shift, right + 2, bottom - shift), fill=colour)
        draw.text((x + 1, y - shift), label, fill=(0, 0, 0), font=font)
    return canvas


def save_visualizations(
    coco_gt,
    image_dir: str,
    results: Sequence[dict],
    image_ids: Sequence[int],
    out_dir: str,
    limit: int = 16,
    score_min: float = 0.3,
) -> List[str]:
    """Writes ``<out_dir>/<image_id>.png`` for the first ``limit`` of ``image_ids``.

    Returns:
        The paths written.
    """
    from PIL import Image

    if limit < 0:
        raise ValueError(f"limit should be >= 0, got {limit}")
    os.makedirs(out_dir, exist_ok=True)
    names = {int(cat["id"]): str(cat["name"]) for cat in coco_gt.dataset.get("categories", [])}
    by_image: Dict[int, List[dict]] = {}
    for entry in results:
        by_image.setdefault(int(entry["image_id"]), []).append(entry)
    written = []
    for image_id in sorted(set(int(i) for i in image_ids))[:limit]:
        info = coco_gt.loadImgs(image_id)[0]
        with Image.open(os.path.join(image_dir, info["file_name"])) as image:
            truth = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id))
            canvas = draw_detections(image, by_image.get(image_id, []), names, score_min, truth)
        path = os.path.join(out_dir, f"{image_id:06d}.png")
        canvas.save(path)
        written.append(path)
    return written


def infer_batch(
    detector: torch.nn.Module,
    images: Tensor,
    targets: Sequence[Mapping[str, object]],
    anchors: Tensor,
    postprocess_fn: PostprocessFn,
    timer: StageTimer,
    label_to_category: Optional[Mapping[int, int]] = None,
) -> Dict[int, List[dict]]:
    """Forward, postprocess and COCO conversion of one batch, each stage timed.

    Args:
        detector: a ``SingleStageDetector``: ``detector(images) -> (locs[B, A, 4],
            logits[B, A, C])``, ``detector.postprocess_config`` and
            ``detector.postprocess_inputs()`` (RetinaNet's level sizes).
        images (Tensor[B, 3, H, W]): the network input.
        targets: B dicts with ``image_id`` and ``orig_size`` (h, w).
        anchors (Tensor[A, 4]): xyxy anchors in network-input pixels.
        postprocess_fn: :func:`ssd_post.postprocess` or the torchvision loop.
        timer: receives ``forward``, ``postprocess`` and ``evaluation`` (the
            conversion to COCO entries, which COCOeval needs whatever the postprocess).
        label_to_category: model label -> COCO category id.

    Returns:
        image id -> that image's COCO results entries (original-image pixels); every
        image of the batch is a key, also one without detections.
    """
    input_size = (int(images.shape[-2]), int(images.shape[-1]))
    with timer.stage("forward"):
        locs, logits = detector(images)  # [B, A, 4], [B, A, C]
    with timer.stage("postprocess"):
        detections = postprocess_fn(
            locs,
            logits,
            anchors,
            [input_size] * images.shape[0],
            detector.postprocess_config,
            **detector.postprocess_inputs(),
        )
    with timer.stage("evaluation"):
        return detections_by_image(detections, targets, input_size, label_to_category)


def run_inference(
    detector: torch.nn.Module,
    loader: Iterable,
    postprocess_fn: PostprocessFn,
    timer: StageTimer,
    label_to_category: Optional[Mapping[int, int]] = None,
) -> Dict[int, List[dict]]:
    """The single-process loop over a loader of ``(images[B, 3, H, W], targets)``.

    Waiting for the next batch is the ``data`` stage; see :func:`infer_batch` for
    the others. Returns image id -> COCO results entries.
    """
    detector.eval()
    anchors = detector.anchors()  # [A, 4]; fixed for a fixed input size, so outside the timing
    per_image: Dict[int, List[dict]] = {}
    batches = iter(loader)
    with torch.inference_mode():
        while True:
            with timer.stage("data"):
                batch = next(batches, None)
            if batch is None:
                break
            images, targets = batch
            per_image.update(
                infer_batch(
                    detector, images, targets, anchors, postprocess_fn, timer, label_to_category
                )
            )
    return per_image
