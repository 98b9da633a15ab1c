"""batched_nms with and without max_kept on one group of many random boxes (what a
YOLO validation run sends into NMS: up to 30,000 boxes an image, 300 kept), next
to the time torch takes to sort as many floats.

    python -m benchmarks.nms                          # 30,000 boxes, max_kept=300
    python -m benchmarks.nms --boxes 30000 --max-kept 300 --repeats 21

Prints the medians and writes benchmarks/results/nms.json. The goal of the bounded
call: within 5x of the sort. Each result is checked against the full NMS first.
"""

from __future__ import annotations

import argparse
import datetime
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torchvision

import ssd_post

from .common import RESULTS_DIR, machine_info, write_json
from .timing import time_calls

IMAGE_SIZE = 640.0


def random_boxes(n: int, seed: int) -> Dict[str, torch.Tensor]:
    """n xyxy boxes inside a 640 x 640 image (sides 1 to 193 px), uniform scores,
    one group."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=generator) * IMAGE_SIZE * 0.8
    wh = torch.rand(n, 2, generator=generator) * IMAGE_SIZE * 0.3 + 1.0
    return {
        "boxes": torch.cat((xy, xy + wh), dim=1),
        "scores": torch.rand(n, generator=generator),
        "idxs": torch.zeros(n, dtype=torch.int64),
    }


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--boxes", type=int, default=30000)
    p.add_argument("--max-kept", type=int, default=300)
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=15, help="timed calls (median reported)")
    p.add_argument("--budget-s", type=float, default=20.0, help="time budget per method")
    p.add_argument("--torchvision", action="store_true", help="also time torchvision.ops.nms")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "nms.json"))
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    data = random_boxes(args.boxes, seed=0)
    boxes, scores, idxs = data["boxes"], data["scores"], data["idxs"]
    thr = args.iou_threshold

    full = ssd_post.batched_nms(boxes, scores, idxs, thr)
    bounded = ssd_post.batched_nms(boxes, scores, idxs, thr, max_kept=args.max_kept)
    if bounded.tolist() != full[: args.max_kept].tolist():
        raise AssertionError("max_kept should give the full NMS truncated")
    values = scores.numpy()
    calls = {
        # torch's sort (values and indices) and numpy's sort of the values alone, the
        # fastest sort of N floats at hand; NMS needs the order, i.e. an argsort.
        "sort": lambda: torch.sort(scores, descending=True),
        "numpy_sort": lambda: np.sort(values),
        "numpy_argsort": lambda: np.argsort(values),
        "batched_nms_max_kept": lambda: ssd_post.batched_nms(
            boxes, scores, idxs, thr, max_kept=args.max_kept
        ),
        "batched_nms_full": lambda: ssd_post.batched_nms(boxes, scores, idxs, thr),
    }
    if args.torchvision:
        calls["torchvision_nms"] = lambda: torchvision.ops.nms(boxes, scores, thr)
    medians_ms = {}
    for name, call in calls.items():
        call()  # warm-up
        median, _ = time_calls(call, args.repeats, args.budget_s)
        medians_ms[name] = median * 1e3
        print(f"{name:>22}: {medians_ms[name]:9.3f} ms")
    ratios = {
        name: medians_ms["batched_nms_max_kept"] / medians_ms[name]
        for name in ("sort", "numpy_sort", "numpy_argsort")
    }
    for name, ratio in ratios.items():
        print(
            f"max_kept={args.max_kept} / {name} of {args.boxes} floats: {ratio:.2f}x (goal: <= 5x)"
        )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "boxes": args.boxes,
        "max_kept": args.max_kept,
        "iou_threshold": thr,
        "survivors_full": len(full),
        "median_ms": medians_ms,
        "max_kept_over": ratios,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
