"""The rest of the family deployed: ssd_post's per-level postprocess (RetinaNet and
FCOS at 800x800, the inputs of benchmarks.family) and YOLOv8's non_max_suppression
(prediction and validation, the inputs of benchmarks.yolo), exported to ONNX and run
in onnxruntime and OpenVINO (CPU, f32), against ssd_post in eager PyTorch.

    python -m benchmarks.deploy_family                 # B = 8 (family), B = 16 (YOLO), 2 threads
    python -m benchmarks.deploy_family --models fcos --regimes prediction --repeats 5
    python -m benchmarks.deploy_family --quick --out-dir /tmp/out   # smoke: small shapes
    python -m benchmarks.deploy_family --profile --models retinanet --scenarios dense

Only the postprocess is timed: head outputs in, anchors and level sizes baked into
the graph, which is exported at B = 2 (dynamic batch) and loaded once per case,
outside the timed calls. torch, onnxruntime (intra-op threads) and OpenVINO
(INFERENCE_NUM_THREADS) get the same thread count. Parity first: each runtime's
detections against eager's (benchmarks.parity: counts and labels equal, scores to
rtol 1e-6, boxes to 1e-3 px; YOLO's list of rows padded to the graph's layout);
a runtime that fails is not timed. The methods take turns, one call each per round
(the machine may be shared), after a pause that lets onnxruntime's worker threads,
which spin for 20 to 35 ms of CPU after each run, fall asleep: otherwise they take a
core from the call that follows. The median of the rounds is reported with the samples
and their spread. Writes benchmarks/results/deploy_family.{json,png}.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import ssd_post

from . import deploy, family, yolo
from .common import RESULTS_DIR, bar_plot, load_average, machine_info, write_json
from .parity import ParityResult, compare, detections_from_rows
from .timing import spread, time_rounds

EXPORT_BATCH = 2  # the graphs have a dynamic batch; the docs ask for an example of B >= 2


@dataclass
class Case:
    """One timed shape: how to make its input, run it in eager, feed and export its
    graph, and the detections every runtime must give."""

    name: str  # "retinanet sparse", "yolo validation"
    batch: int
    fresh: Callable[[], object]  # the input of one call, made outside the timer
    eager: Callable[[object], object]  # ssd_post in eager PyTorch
    graph_inputs: Callable[[object], Tuple[Tensor, ...]]  # the exported graph's inputs
    export: Callable[[str, str], str]  # (path, tie_order) -> the graph written at path
    expected: ssd_post.Detections  # eager's detections in the graph's padded layout
    shape: Dict[str, int]


def _example(t: Optional[Tensor]) -> Optional[Tensor]:
    """The export's example: the first EXPORT_BATCH images (one repeated if alone)."""
    if t is None:
        return None
    return (
        t[:EXPORT_BATCH] if t.shape[0] >= EXPORT_BATCH else t[:1].expand(EXPORT_BATCH, *t.shape[1:])
    )


def family_case(model: str, scenario: str, batch: int, image_size: int) -> Case:
    """RetinaNet / FCOS: ``ssd_post.postprocess`` with per-level selection."""
    from ssd_post import onnx as ssd_onnx
    from ssd_post.exportable import postprocess_input_names

    inp = family.make_inputs(model, scenario, batch, image_size=image_size)
    given = {
        "locs": inp["locs"],
        "logits": inp["logits"],
        "image_sizes": torch.tensor(inp["sizes"], dtype=torch.int64),
        "score_factor": inp["centerness"],
    }
    names = postprocess_input_names(inp["config"], inp["centerness"] is not None)
    args = tuple(given[name] for name in names)

    def export(path: str, tie_order: str) -> str:
        return ssd_onnx.export_postprocess(
            inp["anchors"],
            inp["config"],
            path,
            _example(given["locs"]),
            _example(given["logits"]),
            _example(given["image_sizes"]) if "image_sizes" in names else None,
            level_sizes=inp["level_sizes"],
            example_score_factor=_example(given["score_factor"]),
            tie_order=tie_order,
        )

    _, anchors, classes = inp["logits"].shape
    return Case(
        name=f"{model} {scenario}",
        batch=batch,
        fresh=lambda: None,  # the inputs are read, never written: no copy (as benchmarks.family)
        eager=lambda _: family.run_ssd_post(inp),
        graph_inputs=lambda _: args,
        export=export,
        expected=family.run_ssd_post(inp),
        shape={"anchors": anchors, "classes": classes, "image_size": image_size},
    )


def yolo_case(regime: str, batch: int, classes: int, objects: int) -> Case:
    """YOLOv8: ``ssd_post.non_max_suppression`` on [B, 4 + nc, 8400], each call on a
    fresh copy of the prediction (as benchmarks.yolo)."""
    from ssd_post import onnx as ssd_onnx

    nms = yolo.REGIMES[regime]
    prediction = yolo.make_prediction(batch, classes, objects, seed=0)
    padded = ssd_onnx.yolo_postprocess_module(prediction, classes, **nms).config.padded_detections(
        prediction.shape[2], classes
    )
    rows, indices = ssd_post.non_max_suppression(
        prediction.clone(), nc=classes, return_idxs=True, **nms
    )
    return Case(
        name=f"yolo {regime}",
        batch=batch,
        fresh=prediction.clone,
        eager=lambda x: ssd_post.non_max_suppression(x, nc=classes, **nms),
        graph_inputs=lambda x: (x,),
        export=lambda path, tie_order: ssd_onnx.export_yolo_postprocess(
            path, _example(prediction), nc=classes, tie_order=tie_order, **nms
        ),
        expected=detections_from_rows(rows, indices, padded),
        shape={"anchors": prediction.shape[2], "classes": classes},
    )


def _parity_entry(result: ParityResult, runtime: str) -> Dict:
    from ssd_post import onnx as ssd_onnx

    return {
        "tie_order": ssd_onnx.fastest_exact_tie_order(runtime),
        "ok": result.ok,
        "detections": result.detections,
        "differing": result.differing,
        "tie_reordered": result.tie_reordered,
        "near_tie_reordered": result.near_tie_reordered,
        "message": result.message,
    }


def export_case(case: Case, runtime: str, folder: str) -> str:
    """The case's graph for ``runtime`` in ``folder``: the cheapest graph that is exact
    there (``ssd_post.onnx.fastest_exact_tie_order``: onnxruntime's TopK keeps equal
    scores in index order, OpenVINO's does not, so its graph orders them itself),
    exported once per tie order."""
    from ssd_post import onnx as ssd_onnx

    tie_order = ssd_onnx.fastest_exact_tie_order(runtime)
    path = os.path.join(folder, f"{case.name.replace(' ', '_')}_{tie_order}.onnx")
    return path if os.path.exists(path) else case.export(path, tie_order)


def run_case(case: Case, runtimes: List[str], args: argparse.Namespace, folder: str) -> Dict:
    """Exports and loads the case's graph in each runtime, checks parity, then times
    eager and every runtime that passed, in rounds."""
    from ssd_post import onnx as ssd_onnx

    calls: Dict[str, Callable[[object], object]] = {"ssd_post": case.eager}
    parity = {}
    for runtime in runtimes:
        run = ssd_onnx.load_runner(export_case(case, runtime, folder), runtime, args.threads)
        # The parity call is also the runtime's first (OpenVINO's takes much longer).
        result = compare(run(*case.graph_inputs(case.fresh())), case.expected, near_ties=True)
        parity[runtime] = _parity_entry(result, runtime)
        if result.ok:
            calls[runtime] = lambda x, run=run: run(*case.graph_inputs(x))
        else:
            print(f"{case.name}: {runtime} differs from eager: {result.message}", flush=True)
    load_start = load_average()
    samples = time_rounds(calls, case.fresh, args.repeats, args.budget_s, args.settle_s)
    row = {
        "case": case.name,
        "batch": case.batch,
        **case.shape,
        "detections": int(case.expected.num_detections.sum()),
        "parity": parity,
        "median_ms": {name: 1e3 * statistics.median(s) for name, s in samples.items()},
        "min_ms": {name: 1e3 * min(s) for name, s in samples.items()},
        "samples_ms": {name: [round(1e3 * v, 3) for v in s] for name, s in samples.items()},
        "spread": {name: round(spread(s), 3) for name, s in samples.items()},
        "load_average": [load_start, load_average()],
    }
    return row


def markdown_table(rows: List[Dict], methods: List[str]) -> str:
    """The docs' table: median ms per method, each runtime's time over eager's, parity."""
    runtimes = [m for m in methods if m != "ssd_post"]
    head = ["case", "B", "detections"] + [f"{m} ms" for m in methods]
    head += [f"{r} / ssd_post" for r in runtimes] + ["parity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        ms = row["median_ms"]
        cells = [row["case"], str(row["batch"]), str(row["detections"])]
        cells += [f"{ms[m]:.1f}" if m in ms else "not timed" for m in methods]
        cells += [f"{ms[r] / ms['ssd_post']:.1f}x" if r in ms else "-" for r in runtimes]
        notes = []
        for runtime, p in row["parity"].items():
            if not p["ok"]:
                notes.append(f"{runtime} failed: {p['message']}")
            elif p["tie_reordered"] or p["near_tie_reordered"]:
                notes.append(
                    f"{runtime}: ok, {p['tie_reordered']} in exact ties and "
                    f"{p['near_tie_reordered']} in near ties (rtol 1e-6) reordered"
                )
        cells.append("; ".join(notes) or "ok")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], methods: List[str], threads: int, path: str) -> str:
    """Median ms per call, one group of bars per case, log scale (a runtime that was
    not timed has no bar)."""
    return bar_plot(
        [row["case"].replace(" ", "\n") + f"\nB = {row['batch']}" for row in rows],
        {m: [row["median_ms"].get(m, float("nan")) for row in rows] for m in methods},
        f"ms per call (median), {threads} threads",
        "Exported postprocess: eager ssd_post vs ONNX runtimes",
        path,
    )


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models", nargs="*", choices=sorted(family.CONFIGS), default=["retinanet", "fcos"]
    )
    p.add_argument(
        "--scenarios", nargs="*", choices=("sparse", "dense"), default=["sparse", "dense"]
    )
    p.add_argument(
        "--regimes", nargs="*", choices=sorted(yolo.REGIMES), default=["prediction", "validation"]
    )
    p.add_argument("--batch", type=int, default=8, help="RetinaNet / FCOS batch")
    p.add_argument("--yolo-batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=family.IMAGE_SIZE, help="RetinaNet / FCOS")
    p.add_argument("--classes", type=int, default=80, help="YOLO's nc")
    p.add_argument("--objects", type=int, default=10, help="YOLO objects per image")
    p.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and OpenVINO alike")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    p.add_argument("--budget-s", type=float, default=60.0, help="time budget per method and case")
    p.add_argument(
        "--settle-s", type=float, default=0.1, help="pause before each timed call (untimed)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print each runtime's time per op type for each case instead (times nothing)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke: B = 2, 256x256 family images, 2 rounds; writes only with --out-dir",
    )
    p.add_argument(
        "--out-dir", default=None, help=f"where deploy_family.{{json,png}} go ({RESULTS_DIR})"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batch = args.yolo_batch = 2
        args.image_size, args.repeats, args.budget_s, args.settle_s = 256, 2, 1.0, 0.01
    elif args.out_dir is None:
        args.out_dir = RESULTS_DIR
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    runtimes = [r for r in ("onnxruntime", "openvino") if r in deploy.available_runtimes()]
    if not runtimes:
        raise SystemExit("needs the export extra: pip install ssd-post[export]")
    torch.set_num_threads(args.threads)
    methods = ["ssd_post"] + runtimes
    results = {
        "command": " ".join(
            ["python -m benchmarks.deploy_family"] + (argv if argv is not None else sys.argv[1:])
        ),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": args.threads,
        "versions": {m: importlib.import_module(m).__version__ for m in ["torch"] + runtimes},
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "settle_s": args.settle_s,
        "load_average_start": load_average(),
        "rows": [],
    }
    cases: List[Callable[[], Case]] = [
        lambda m=m, s=s: family_case(m, s, args.batch, args.image_size)
        for m in args.models
        for s in args.scenarios
    ] + [
        lambda r=r: yolo_case(r, args.yolo_batch, args.classes, args.objects) for r in args.regimes
    ]
    with tempfile.TemporaryDirectory(prefix="ssd_post_deploy_family_") as folder:
        for make in cases:
            case = make()
            if args.profile:
                print(f"{case.name}, B = {case.batch}:")
                for runtime in runtimes:
                    path = export_case(case, runtime, folder)
                    feeds = case.graph_inputs(case.fresh())
                    deploy.print_profile(deploy.profile_graph(path, feeds, 3, [runtime]), top=6)
                continue
            row = run_case(case, runtimes, args, folder)
            del case
            gc.collect()  # this case's inputs and sessions go before the next one's come
            results["rows"].append(row)
            print(
                f"{row['case']:<20} B={row['batch']:<3} detections={row['detections']:<5} "
                + " ".join(f"{m}={ms:.1f}ms" for m, ms in row["median_ms"].items()),
                flush=True,
            )
    if args.profile:
        return results
    results["load_average_end"] = load_average()
    table = markdown_table(results["rows"], methods)
    print(table)
    if args.out_dir:
        write_json(os.path.join(args.out_dir, "deploy_family.json"), results)
        path = plot(
            results["rows"], methods, args.threads, os.path.join(args.out_dir, "deploy_family.png")
        )
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
