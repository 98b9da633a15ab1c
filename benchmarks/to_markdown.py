"""Prints the Markdown table of the latest results (for docs/benchmarks.md).

python -m benchmarks.to_markdown [results_dir]
"""

from __future__ import annotations

import glob
import json
import os
import sys

from .report import markdown_table
from .common import RESULTS_DIR


def main(results_dir: str = RESULTS_DIR) -> str:
    rows, meta = [], None
    for path in sorted(glob.glob(os.path.join(results_dir, "cpu_*.json"))):
        with open(path) as f:
            data = json.load(f)
        rows.extend(data["rows"])
        meta = meta or data
    if meta is None:
        raise SystemExit(f"no cpu_*.json in {results_dir}")
    order = {"sparse": 0, "dense": 1, "real": 2}
    rows.sort(key=lambda r: (order.get(r["scenario"], 9), r["model"], r["batch"]))
    head = (
        f"Command: `{meta['command']}` ({meta['date']}; {meta['machine']['cpu']}, "
        f"{meta['machine']['torch_threads']} torch threads, torch {meta['machine']['torch']}; "
        f"load average at start {meta['load_average_start']}, "
        f"at end {meta.get('load_average_end')})"
    )
    merged = {
        (m["command"], m["date"], tuple(m["load_average_start"]))
        for path in sorted(glob.glob(os.path.join(results_dir, "cpu_*.json")))
        for m in json.load(open(path)).get("merged_runs", [])
    }
    for command, date, load in sorted(merged, key=lambda m: m[1]):
        head += f"\n\nRows re-measured by `{command}` ({date}; load average at start {list(load)})."
    return head + "\n\n" + markdown_table(rows)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
