"""CPU benchmark of SSD postprocessing: every method on the same inputs, in one process.

    python -m benchmarks.run                      # the full run (make bench)
    python -m benchmarks.run --quick              # a smoke run in seconds

For each (scenario, model, batch) every detection method first has its output
checked against torchvision's (parity); only then is it timed. Methods whose
previous batch size says a call would take longer than --max-call-s are skipped
at the larger sizes, with the estimate in the table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from . import memory, report
from .common import RESULTS_DIR, load_average, load_inputs, machine_info
from .methods import METHODS, PREPARE, REFERENCES, parity_oracle
from .parity import compare
from .real import unavailable_reason
from .scenarios import MODELS
from .timing import time_calls


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--scenarios", default="sparse,dense,real", help="comma list of sparse, dense, real"
    )
    p.add_argument(
        "--models", default="ssd300,ssdlite320", help=f"comma list of {', '.join(MODELS)}"
    )
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma list (torchvision always runs: it is the oracle)",
    )
    p.add_argument(
        "--repeats", type=int, default=7, help="timed calls per method (median reported)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=15.0,
        help="stop repeating a method after this many seconds",
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=30.0,
        help="skip a method (torchvision excepted) whose call would take longer",
    )
    p.add_argument(
        "--memory-batches",
        default="32",
        help="batch sizes whose extra memory is measured ('' for none)",
    )
    p.add_argument("--out-dir", default=RESULTS_DIR)
    p.add_argument(
        "--merge",
        action="store_true",
        help="replace only the rows this run measured in the existing JSON files",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: toy model, batches 1,2, 2 repeats, no memory (flags given still win)",
    )
    args = p.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        defaults = {
            "--models": "toy",
            "--batch-sizes": "1,2",
            "--repeats": 2,
            "--budget-s": 1.0,
            "--memory-batches": "",
            "--scenarios": "sparse,dense",
        }
        for flag, value in defaults.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    return args


def _split(text: str) -> List[str]:
    return [t for t in text.split(",") if t]


def _estimate_s(last: Optional[tuple], batch: int) -> float:
    """Seconds a call at ``batch`` may take, from (batch, seconds) of the last size.

    Scaled by the cube of the batch ratio: the flatten + batched_nms methods grow
    faster than linearly (torchvision's batched_nms scans all N boxes once per key,
    and both grow with B), and a skipped slow method costs less than a stalled run.
    flatten_nms also carries the time of its own oracle, which runs with it.
    """
    if last is None:
        return 0.0
    last_batch, seconds = last
    return seconds * (batch / last_batch) ** 3


def run_case(
    scenario: str,
    model: str,
    batch: int,
    methods: List[str],
    args,
    per_image_estimate: Dict[str, tuple],
) -> List[Dict]:
    """Parity, then timing, of every method on one batch of inputs."""
    inp = load_inputs(scenario, model, batch)
    print(f"\n{scenario} / {model} / batch {batch}: logits {tuple(inp.logits.shape)}", flush=True)
    oracles: Dict[str, object] = {}
    rows = []
    for method in methods:
        row = {"scenario": scenario, "model": model, "batch": batch, "method": method}
        rows.append(row)
        estimate = _estimate_s(per_image_estimate.get(method), batch)
        # torchvision is the oracle of every other method: it always runs.
        if method != "torchvision" and estimate > args.max_call_s:
            row["skipped"] = f"skip (~{estimate:.0f} s)"
            print(f"  {method:18s} skipped: a call would take about {estimate:.0f} s", flush=True)
            continue
        fn = METHODS[method]
        if method in PREPARE:
            PREPARE[method](inp)  # export / session set-up: not part of a call
        oracle_s = 0.0
        start = time.perf_counter()
        out = fn(inp)
        first_s = time.perf_counter() - start
        if method not in REFERENCES:
            key = "no_topk" if method == "flatten_nms" else "topk"
            if key not in oracles:
                # torchvision's own output is its oracle: no second call needed.
                start = time.perf_counter()
                oracles[key] = out if method == "torchvision" else parity_oracle(method, inp)
                oracle_s = time.perf_counter() - start
            result = compare(out, oracles[key])
            row["parity"] = "ok" if result.ok else f"FAIL {result.differing}/{result.detections}"
            if result.ok and result.tie_reordered:
                row["parity"] = f"ok (ties {result.tie_reordered})"
            row["parity_detail"] = {
                "ok": result.ok,
                "detections": result.detections,
                "differing": result.differing,
                "message": result.message,
                "tie_reordered": result.tie_reordered,
            }
            if not result.ok:
                print(f"  {method:18s} parity FAILED: {result.message}", flush=True)
                continue
        del out
        # A call slower than the budget is timed once: its first call is the sample.
        call = lambda: fn(inp)  # noqa: E731
        median, samples = time_calls(
            call, args.repeats, args.budget_s, first_s=first_s if first_s > args.budget_s else None
        )
        row["median_s"], row["samples_s"] = median, samples
        per_image_estimate[method] = (batch, median + oracle_s)
        parity = row.get("parity", "-")
        print(
            f"  {method:18s} {1e3 * median:10.2f} ms  ({len(samples)} runs, parity {parity})",
            flush=True,
        )
    by_method = {r["method"]: r for r in rows}
    base = by_method.get("torchvision", {}).get("median_s")
    amax = by_method.get("amax", {}).get("median_s")
    for r in rows:
        if r.get("median_s"):
            if base:
                r["speedup_vs_torchvision"] = base / r["median_s"]
            if amax:
                r["ratio_to_amax"] = r["median_s"] / amax
    return rows


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    methods = _split(args.methods)
    if "torchvision" not in methods:
        methods.insert(0, "torchvision")
    methods.sort(key=lambda m: m != "torchvision")  # the oracle runs first
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    scenarios = _split(args.scenarios)
    # real runs last, so a checkpoint that appears during the run is still used.
    scenarios.sort(key=lambda s: s == "real")
    batches = [int(b) for b in _split(args.batch_sizes)]
    memory_batches = {int(b) for b in _split(args.memory_batches)}
    results = {
        "command": " ".join(
            ["python -m benchmarks.run"] + (argv if argv is not None else sys.argv[1:])
        ),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_start": load_average(),
        "skipped": {},
        "rows": [],
    }
    print(
        f"load average {results['load_average_start']}, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    for scenario in scenarios:
        if scenario == "real":
            reason = unavailable_reason()
            if reason:
                print(f"\nreal scenario skipped: {reason}", flush=True)
                results["skipped"]["real"] = reason
                continue
        models = ["tiny"] if scenario == "real" else _split(args.models)
        for model in models:
            estimate: Dict[str, tuple] = {}
            for batch in batches:
                rows = run_case(scenario, model, batch, methods, args, estimate)
                if batch in memory_batches:
                    for r in rows:
                        if r.get("median_s"):
                            r["memory"] = memory.measure(scenario, model, batch, r["method"])
                results["rows"].extend(rows)
    results["load_average_end"] = load_average()
    print("\n" + report.table(results["rows"]))
    if results["rows"]:
        paths = report.write_json(results, args.out_dir, merge=args.merge)
        paths.append(
            report.plot(report.load_rows(args.out_dir), os.path.join(args.out_dir, "cpu.png"))
        )
        print("\nwrote " + ", ".join(paths))
    return results


if __name__ == "__main__":
    main()
