"""GPU postprocess benchmark on SSD300 shapes (8732 anchors, 91 classes).

    python -m benchmarks.gpu [--batches 1 8 32 64] [--scenarios sparse dense] [--iters 20]

The same scenarios (benchmarks.scenarios) and methods (benchmarks.methods) as the
CPU benchmark, on the GPU:
  ssd_post          ssd_post.postprocess on the CUDA kernels (no host synchronization)
  torchvision       torchvision's own SSD.postprocess_detections loop over images
  flatten_topk_nms  the usual vectorised approach: softmax and per-class top-k on the
                    whole batch, nonzero, decode, one torchvision.ops.batched_nms
Each method's detections are first compared with torchvision's on the same device
(benchmarks.parity: labels and counts exactly, scores to 1e-6, boxes to 1e-3 px,
equal-score ties as sets); the parity result is recorded next to the time. CUDA
scores come from the device's expf, so a near-tie may reorder: the JSON says so
instead of hiding the method.

Times are medians over CUDA events around whole calls (Python included). Writes
benchmarks/results/gpu_<device>.json. `--device cpu` runs the same code on the
CPU (with perf_counter), which the tests use to keep this script working on a
machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import replace
from typing import Callable, List

import torch

from .common import RESULTS_DIR
from .methods import METHODS
from .parity import compare
from .scenarios import MODELS, Inputs, make_inputs

GPU_METHODS = ("torchvision", "flatten_topk_nms", "ssd_post")


def to_device(inp: Inputs, device: torch.device) -> Inputs:
    return replace(
        inp,
        locs=inp.locs.to(device),
        logits=inp.logits.to(device),
        anchors=inp.anchors.to(device),
        image_sizes=inp.image_sizes.to(device),
    )


def time_call(
    fn: Callable[[], object], device: torch.device, warmup: int, iters: int
) -> List[float]:
    """Milliseconds of `iters` calls after `warmup`, each call timed alone."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def benchmark(
    device: torch.device,
    model: str,
    scenarios: List[str],
    batches: List[int],
    iters: int,
    slow_iters: int,
) -> List[dict]:
    rows = []
    for scenario in scenarios:
        for batch in batches:
            inp = to_device(make_inputs(scenario, model, batch), device)
            oracle = METHODS["torchvision"](inp).to("cpu")
            for name in GPU_METHODS:
                fn = METHODS[name]
                parity = compare(fn(inp).to("cpu"), oracle)
                slow = name == "torchvision"
                times = time_call(
                    lambda: fn(inp),
                    device,
                    warmup=1 if slow else 3,
                    iters=slow_iters if slow else iters,
                )
                row = {
                    "scenario": scenario,
                    "model": model,
                    "batch": batch,
                    "method": name,
                    "median_ms": statistics.median(times),
                    "min_ms": min(times),
                    "iters": len(times),
                    "parity_ok": parity.ok,
                    "parity_detail": {
                        "detections": parity.detections,
                        "differing": parity.differing,
                        "tie_reordered": parity.tie_reordered,
                        "message": parity.message,
                    },
                }
                rows.append(row)
                print(
                    f"{scenario:7s} B={batch:3d} {name:17s} median {row['median_ms']:9.3f} ms"
                    f"  min {row['min_ms']:9.3f} ms  parity "
                    f"{'ok' if parity.ok else 'DIFFERS: ' + parity.message}",
                    flush=True,
                )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--scenarios", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"]
    )
    parser.add_argument("--model", default="ssd300", choices=sorted(MODELS))
    parser.add_argument("--iters", type=int, default=20, help="timed calls of the fast methods")
    parser.add_argument(
        "--slow-iters", type=int, default=3, help="timed calls of torchvision's per-image loop"
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, for tests")
    parser.add_argument(
        "--out", default=None, help="JSON path (default: results/gpu_<device>.json)"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    import ssd_post

    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(
                "benchmarks.gpu: no CUDA device is available; this benchmark only runs on a GPU.",
                file=sys.stderr,
            )
            return 2
        if not ssd_post.has_cuda_kernels():
            print(
                "benchmarks.gpu: ssd_post was built without its CUDA kernels (no nvcc at build "
                "time); rebuild with nvcc on PATH.",
                file=sys.stderr,
            )
            return 2
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{device.type} (test run)"

    rows = benchmark(device, args.model, args.scenarios, args.batches, args.iters, args.slow_iters)
    config = MODELS[args.model].config
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": args.model,
        "config": {
            "score_thresh": config.score_thresh,
            "nms_thresh": config.nms_thresh,
            "topk_candidates": config.topk_candidates,
            "detections_per_img": config.detections_per_img,
        },
        "command": "python -m benchmarks.gpu "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": rows,
    }
    out = args.out or os.path.join(
        RESULTS_DIR, "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
