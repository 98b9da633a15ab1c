"""GPU postprocess benchmark on SSD300 shapes (8732 anchors, 91 classes).

    python -m benchmarks.gpu [--batches 1 8 32 64] [--iters 20]

Times, per batch size, with CUDA events around whole calls (Python included):
  ssd_post       ssd_post.postprocess on the CUDA kernels (no host synchronization)
  torchvision    ssd_post.reference.torchvision_postprocess: torchvision's own
                 SSD.postprocess_detections loop over images and classes
  flatten_nms    the usual vectorised approach: softmax + per-class topk on the
                 whole batch, nonzero, decode, torchvision.ops.batched_nms, then a
                 per-image top-k
and writes benchmarks/results/gpu_<device>.json.

Two logit scenarios: `random` (standard normal logits: about a quarter of all
(anchor, class) pairs pass score_thresh = 0.01, the heaviest case) and `confident`
(background logit raised by 6, as from a trained detector on a sparse image:
few candidates).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Callable, Dict, List

import torch

SSD300_GRIDS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
NUM_CLASSES = 91
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def make_batch(batch: int, scenario: str, anchors: torch.Tensor, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    num_anchors = anchors.shape[0]
    locs = torch.randn(batch, num_anchors, 4, device="cuda", generator=gen) * 0.5
    logits = torch.randn(batch, num_anchors, NUM_CLASSES, device="cuda", generator=gen)
    if scenario == "confident":
        logits[..., 0] += 6.0
    sizes = torch.full((batch, 2), 300, dtype=torch.int64, device="cuda")
    return locs, logits, anchors, sizes


def flatten_batched_nms(locs, logits, anchors, sizes, config):
    """Whole-batch softmax and per-class topk, then torchvision.ops.batched_nms."""
    import torchvision

    from ssd_post.box_coder import BoxCoder

    batch, num_anchors, num_classes = logits.shape
    probs = logits.float().softmax(-1)[:, :, 1:]  # [B, A, C - 1]
    k = min(config.topk_candidates, num_anchors)
    top_scores, top_anchors = probs.transpose(1, 2).topk(k, dim=2)  # [B, C - 1, k]
    image, cls, slot = torch.nonzero(top_scores > config.score_thresh, as_tuple=True)
    anchor = top_anchors[image, cls, slot]
    scores = top_scores[image, cls, slot]
    boxes = BoxCoder(config.box_weights).decode(locs[image, anchor], anchors[anchor])
    limits = sizes[image].flip(1).repeat(1, 2).to(boxes.dtype)  # (w, h, w, h)
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    labels = cls + 1
    keep = torchvision.ops.batched_nms(boxes, scores, image * num_classes + labels, config.nms_thresh)
    # keep is by decreasing score; a stable sort by image keeps that order per image.
    keep = keep[torch.sort(image[keep], stable=True).indices]
    kept_image = image[keep]
    counts = torch.bincount(kept_image, minlength=batch)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - first[kept_image]
    chosen = rank < config.detections_per_img
    keep, kept_image, rank = keep[chosen], kept_image[chosen], rank[chosen]
    out_boxes = boxes.new_zeros(batch, config.detections_per_img, 4)
    out_scores = scores.new_zeros(batch, config.detections_per_img)
    out_labels = labels.new_zeros(batch, config.detections_per_img)
    out_boxes[kept_image, rank] = boxes[keep]
    out_scores[kept_image, rank] = scores[keep]
    out_labels[kept_image, rank] = labels[keep]
    return out_boxes, out_scores, out_labels, counts.clamp(max=config.detections_per_img)


def time_call(fn: Callable[[], object], warmup: int, iters: int) -> List[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--scenarios", nargs="+", default=["random", "confident"],
                        choices=["random", "confident"])
    parser.add_argument("--iters", type=int, default=20, help="timed calls of the fast methods")
    parser.add_argument("--slow-iters", type=int, default=3,
                        help="timed calls of torchvision's per-image loop")
    parser.add_argument("--out", default=None, help="JSON path (default: results/gpu_<device>.json)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device is available; this benchmark only runs on a GPU.",
              file=sys.stderr)
        return 2
    import ssd_post
    from ssd_post import DefaultBoxes, PostprocessConfig
    from ssd_post.reference import torchvision_postprocess

    if not ssd_post.has_cuda_kernels():
        print("benchmarks.gpu: ssd_post was built without its CUDA kernels (no nvcc at build "
              "time); rebuild with nvcc on PATH.", file=sys.stderr)
        return 2

    device_name = torch.cuda.get_device_name()
    config = PostprocessConfig()  # torchvision SSD300's thresholds
    anchors = DefaultBoxes.ssd300()((300, 300), SSD300_GRIDS).cuda()
    methods: Dict[str, Callable] = {
        "ssd_post": lambda l, c, a, s: ssd_post.postprocess(l, c, a, s, config),
        "torchvision": lambda l, c, a, s: torchvision_postprocess(l, c, a, s, config),
        "flatten_nms": lambda l, c, a, s: flatten_batched_nms(l, c, a, s, config),
    }
    results = []
    for scenario in args.scenarios:
        for batch in args.batches:
            inputs = make_batch(batch, scenario, anchors)
            for name, method in methods.items():
                slow = name == "torchvision"
                times = time_call(lambda: method(*inputs), warmup=1 if slow else 3,
                                  iters=args.slow_iters if slow else args.iters)
                row = {"scenario": scenario, "batch": batch, "method": name,
                       "median_ms": statistics.median(times), "min_ms": min(times),
                       "iters": len(times)}
                results.append(row)
                print(f"{scenario:9s} B={batch:3d} {name:12s} median {row['median_ms']:9.3f} ms"
                      f"  min {row['min_ms']:9.3f} ms", flush=True)

    report = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "anchors": int(anchors.shape[0]),
        "classes": NUM_CLASSES,
        "config": {"score_thresh": config.score_thresh, "nms_thresh": config.nms_thresh,
                   "topk_candidates": config.topk_candidates,
                   "detections_per_img": config.detections_per_img},
        "results": results,
    }
    out = args.out or os.path.join(
        RESULTS_DIR, "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
