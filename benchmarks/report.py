"""Outputs of a benchmark run: a table on stdout, JSON and a PNG plot."""

from __future__ import annotations

import json
import os
from typing import Dict, List

COLUMNS = (
    "scenario",
    "model",
    "batch",
    "method",
    "ms/call",
    "ms/image",
    "vs torchvision",
    "vs amax",
    "runs",
    "parity",
    "extra mem",
)


def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _cells(r: Dict) -> tuple:
    mem = r.get("memory")
    mem_text = (
        "-"
        if not mem
        else f"{mem['extra_bytes'] / 2**20:.1f} MiB ({100 * mem['extra_fraction']:.1f}%)"
    )
    ms = r.get("median_s") and 1e3 * r["median_s"]
    return (
        r["scenario"],
        r["model"],
        str(r["batch"]),
        r["method"],
        _fmt(ms, ".2f", r.get("skipped", "-")),
        _fmt(ms and ms / r["batch"], ".3f"),
        _fmt(r.get("speedup_vs_torchvision"), ".1f"),
        _fmt(r.get("ratio_to_amax"), ".2f"),
        str(len(r.get("samples_s", []))),
        r.get("parity", "-"),
        mem_text,
    )


def table(rows: List[Dict]) -> str:
    """One line per (scenario, model, batch, method), aligned."""
    lines = [COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(COLUMNS))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: List[Dict]) -> str:
    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(md)


def _key(row: Dict) -> tuple:
    return row["scenario"], row["model"], row["batch"], row["method"]


def write_json(results: Dict, out_dir: str, merge: bool = False) -> List[str]:
    """One file per scenario: cpu_<scenario>.json with the run's metadata. With
    ``merge``, rows of an existing file that this run did not measure are kept (and
    the file records every command that contributed)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for scenario in sorted({r["scenario"] for r in results["rows"]}):
        path = os.path.join(out_dir, f"cpu_{scenario}.json")
        rows = [r for r in results["rows"] if r["scenario"] == scenario]
        payload = dict(results, rows=rows)
        if merge and os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            fresh = {_key(r) for r in rows}
            kept = [r for r in old["rows"] if _key(r) not in fresh]
            payload = dict(
                old,
                rows=kept + rows,
                merged_runs=old.get("merged_runs", [])
                + [
                    {
                        k: results[k]
                        for k in ("command", "date", "load_average_start", "load_average_end")
                        if k in results
                    }
                ],
            )
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        paths.append(path)
    return paths


def load_rows(out_dir: str) -> List[Dict]:
    """Every row of every cpu_*.json in out_dir."""
    import glob

    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "cpu_*.json"))):
        with open(path) as f:
            rows.extend(json.load(f)["rows"])
    return rows


def plot(rows: List[Dict], path: str) -> str:
    """Time per image against batch size (log-log), one panel per (scenario, model),
    one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["scenario"], r["model"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (scenario, model) in zip(axes[0], panels):
        for method in methods:
            pts = sorted(
                (r["batch"], 1e3 * r["median_s"] / r["batch"])
                for r in rows
                if (r["scenario"], r["model"], r["method"]) == (scenario, model, method)
                and r.get("median_s")
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("ms per image")
        ax.set_title(f"{scenario}, {model}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
