"""RetinaNet and FCOS shapes: ssd_post's per-level postprocess against torchvision's
own per-image loop (the oracle and the baseline) and one read of the logits.

    python -m benchmarks.family --quick                 # smoke: B=1, parity checked
    python -m benchmarks.family --batch 8 --scenario sparse

800x800 input, FPN levels P3-P7 (strides 8..128): 13,343 locations; RetinaNet has 9
anchors per location (120,087 anchors), FCOS one; 91 classes. ``sparse``: a
trained model (almost every logit far below the threshold, a few objects);
``dense``: unit-noise logits (half the sigmoid scores pass RetinaNet's 0.05).
Kept apart from benchmarks.run, whose scenarios are SSD-only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Dict, List, Tuple

import torch
from torch import Tensor

import ssd_post
from ssd_post import PostprocessConfig
from ssd_post.reference import torchvision_postprocess

from .common import RESULTS_DIR, bar_plot, load_average, machine_info
from .timing import time_calls

METHODS = ("torchvision", "ssd_post", "read")

IMAGE_SIZE = 800
STRIDES = (8, 16, 32, 64, 128)
NUM_CLASSES = 91
CONFIGS = {
    "retinanet": PostprocessConfig(
        score_thresh=0.05,
        nms_thresh=0.5,
        topk_candidates=1000,
        detections_per_img=300,
        box_weights=(1, 1, 1, 1),
        score_activation="sigmoid",
        background_class=None,
        selection="per_level",
    ),
    "fcos": PostprocessConfig(
        score_thresh=0.2,
        nms_thresh=0.6,
        topk_candidates=1000,
        detections_per_img=100,
        score_activation="sigmoid",
        score_factor_mode="sqrt",
        background_class=None,
        selection="per_level",
        box_coder="linear",
    ),
}
ANCHORS_PER_LOCATION = {"retinanet": 9, "fcos": 1}


def make_anchors(model: str, image_size: int = IMAGE_SIZE) -> Tuple[Tensor, List[int]]:
    """xyxy anchors (Tensor[A, 4]) in level order for a square image of ``image_size``
    pixels, and the anchors per level."""
    levels, sizes = [], []
    for stride in STRIDES:
        cells = -(-image_size // stride)
        centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        half = torch.tensor([4.0 * stride * s / 2 for s in (1.0, 1.26, 1.59)] * 3)[
            : ANCHORS_PER_LOCATION[model]
        ]
        ctr = torch.stack((cx.flatten(), cy.flatten()), dim=1).repeat_interleave(half.numel(), 0)
        h = half.repeat(cells * cells)[:, None]
        levels.append(torch.cat((ctr - h, ctr + h), dim=1))
        sizes.append(levels[-1].shape[0])
    return torch.cat(levels), sizes


def make_inputs(
    model: str, scenario: str, batch: int, seed: int = 0, image_size: int = IMAGE_SIZE
) -> Dict[str, object]:
    anchors, level_sizes = make_anchors(model, image_size)
    gen = torch.Generator().manual_seed(seed)
    num_anchors = anchors.shape[0]
    logits = torch.randn(batch, num_anchors, NUM_CLASSES, generator=gen)
    if scenario == "sparse":
        logits = logits - 8.0
        hits = torch.randint(0, num_anchors, (batch, 400), generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (batch, 400), generator=gen)
        logits[torch.arange(batch)[:, None], hits, labels] = 4.0 * torch.rand(
            batch, 400, generator=gen
        )
    locs = 0.3 * torch.randn(batch, num_anchors, 4, generator=gen)
    if model == "fcos":
        locs = locs.abs() + 0.5
    centerness = torch.randn(batch, num_anchors, 1, generator=gen) if model == "fcos" else None
    return dict(
        locs=locs,
        logits=logits,
        anchors=anchors,
        level_sizes=level_sizes,
        centerness=centerness,
        sizes=[(image_size, image_size)] * batch,
        config=CONFIGS[model],
        model=model,
    )


def run_ssd_post(inp) -> ssd_post.Detections:
    return ssd_post.postprocess(
        inp["locs"],
        inp["logits"],
        inp["anchors"],
        inp["sizes"],
        inp["config"],
        level_sizes=inp["level_sizes"],
        centerness=inp["centerness"],
    )


def run_torchvision(inp) -> ssd_post.Detections:
    """torchvision's own RetinaNet / FCOS postprocess_detections on the same tensors."""
    return torchvision_postprocess(
        inp["locs"],
        inp["logits"],
        inp["anchors"],
        inp["sizes"],
        inp["config"],
        level_sizes=inp["level_sizes"],
        centerness=inp["centerness"],
    )


def run_read(inp) -> Tensor:
    """One read of the logits: the memory-bound floor."""
    return inp["logits"].amax(-1)


def same_up_to_ties(a: ssd_post.Detections, b: ssd_post.Detections) -> bool:
    """Equal counts and scores to the bit, (label, box) rows equal as sets inside
    each run of equal scores."""
    if not (torch.equal(a.num_detections, b.num_detections) and torch.equal(a.scores, b.scores)):
        return False
    for i, n in enumerate(a.num_detections.tolist()):
        for value in torch.unique(a.scores[i, :n]):
            tied = (a.scores[i, :n] == value).nonzero().flatten()
            rows = [
                sorted(zip(d.labels[i, tied].tolist(), d.boxes[i, tied].tolist())) for d in (a, b)
            ]
            if rows[0] != rows[1]:
                return False
    return True


RUNNERS = {"torchvision": run_torchvision, "ssd_post": run_ssd_post, "read": run_read}


def plot(rows: List[Dict], path: str) -> str:
    """ms per call of each method, one group of bars per (model, scenario), log scale."""
    return bar_plot(
        [f"{r['model']}\n{r['scenario']}" for r in rows],
        {method: [1e3 * r[f"{method}_s"] for r in rows] for method in METHODS},
        f"ms per call, B = {rows[0]['batch']}",
        "RetinaNet / FCOS postprocess, 800x800",
        path,
    )


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="B=1, one repeat, both models and scenarios; writes nothing",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--scenario", choices=("sparse", "dense"), nargs="*", default=["sparse", "dense"]
    )
    parser.add_argument("--model", choices=sorted(CONFIGS), nargs="*", default=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out-dir", default=RESULTS_DIR, help="where family.json and family.png go"
    )
    args = parser.parse_args(argv)
    batch, repeats = (1, 1) if args.quick else (args.batch, args.repeats)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {
        "command": " ".join(
            ["python -m benchmarks.family"] + (argv if argv is not None else sys.argv[1:])
        ),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "rows": [],
    }
    for model in args.model:
        for scenario in args.scenario:
            inp = make_inputs(model, scenario, batch)
            ours, theirs = run_ssd_post(inp), run_torchvision(inp)
            parity = same_up_to_ties(ours, theirs)
            if not parity:
                raise SystemExit(f"{model} {scenario}: ssd_post differs from torchvision")
            times = {
                name: time_calls(lambda fn=RUNNERS[name]: fn(inp), repeats, budget_s=30.0)[0]
                for name in METHODS
            }
            row = {
                "model": model,
                "scenario": scenario,
                "batch": batch,
                "parity": "ok",
                "detections": int(ours.num_detections.sum()),
                **{f"{m}_s": times[m] for m in METHODS},
            }
            results["rows"].append(row)
            print(
                f"{model:9s} {scenario:6s} B={batch} detections={row['detections']} "
                f"parity=ok torchvision={times['torchvision'] * 1e3:.1f}ms "
                f"ssd_post={times['ssd_post'] * 1e3:.1f}ms read={times['read'] * 1e3:.1f}ms "
                f"speedup={times['torchvision'] / times['ssd_post']:.1f}x "
                f"vs_read={times['ssd_post'] / times['read']:.1f}x",
                flush=True,
            )
    results["load_average_end"] = load_average()
    if not args.quick and args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "family.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}, {plot(results['rows'], os.path.join(args.out_dir, 'family.png'))}")
    return results


if __name__ == "__main__":
    main()
