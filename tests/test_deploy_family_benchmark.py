"""The deployed-family benchmark (benchmarks/deploy_family.py): its parity rule for
a runtime's own rounding, YOLO's rows in the graph's layout, the rounds it times in,
and a short run that checks parity and writes its JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.parity import compare, detections_from_rows
from benchmarks.timing import spread, time_rounds
from ssd_post.formats import Detections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _detections(scores, labels, anchors) -> Detections:
    n = len(scores)
    boxes = torch.tensor([[10.0 * a, 0.0, 10.0 * a + 5, 5.0] for a in anchors])
    return Detections(
        boxes[None],
        torch.tensor([scores]),
        torch.tensor([labels]),
        torch.tensor([n]),
        torch.tensor([anchors]),
    )


def test_a_runtime_splitting_a_tie_by_one_ulp_passes_only_with_near_ties():
    """Eager ties two scores (lower anchor first); the runtime rounds the first one
    ULP lower, so it comes second: the same detections, in another order."""
    s = 0.9832068681716919
    below = float(torch.nextafter(torch.tensor(s), torch.tensor(0.0)))
    want = _detections([0.99, s, s, 0.5], [1, 54, 75, 2], [7, 3, 9, 4])
    got = _detections([0.99, s, below, 0.5], [1, 75, 54, 2], [7, 9, 3, 4])
    # boxes follow the anchors, so a reordered pair differs in label, anchor and box
    strict = compare(got, want)
    assert not strict.ok and strict.differing == 2
    near = compare(got, want, near_ties=True)
    assert near.ok, near.message
    assert (near.differing, near.near_tie_reordered, near.tie_reordered) == (0, 2, 0)


def test_near_ties_still_catch_a_swap_of_distinct_scores():
    want = _detections([0.9, 0.8], [1, 2], [0, 1])
    got = _detections([0.9, 0.8], [2, 1], [1, 0])
    result = compare(got, want, near_ties=True)
    assert not result.ok and result.differing == 2
    # and a count that differs is a failure whatever the scores
    fewer = _detections([0.9], [1], [0])
    fewer = Detections(
        torch.cat((fewer.boxes, torch.zeros(1, 1, 4)), 1),
        torch.tensor([[0.9, 0.0]]),
        torch.tensor([[1, 0]]),
        torch.tensor([1]),
        torch.tensor([[0, -1]]),
    )
    assert not compare(fewer, want, near_ties=True).ok


def test_detections_from_rows_pads_like_the_graph():
    rows = [
        torch.tensor([[1.0, 2, 3, 4, 0.9, 5], [2, 3, 4, 5, 0.8, 0]]),
        torch.zeros(0, 6),
    ]
    indices = [torch.tensor([17, 3]), torch.zeros(0, dtype=torch.long)]
    det = detections_from_rows(rows, indices, k=3)
    assert det.boxes.shape == (2, 3, 4)
    assert det.num_detections.tolist() == [2, 0]
    assert det.labels[0].tolist() == [5, 0, 0]
    assert det.anchor_indices.tolist() == [[17, 3, -1], [-1, -1, -1]]
    torch.testing.assert_close(det.scores[0], torch.tensor([0.9, 0.8, 0.0]))
    assert compare(det, det).ok
    # an image with more rows than the graph's K: a shape mismatch, reported
    wide = detections_from_rows(rows, indices, k=1)
    assert wide.boxes.shape == (2, 2, 4)
    assert not compare(wide, det).ok


def test_time_rounds_alternates_and_drops_the_warm_up():
    order, made = [], []

    def fresh():
        made.append(len(order))
        return len(made)

    calls = {"a": lambda x: order.append(("a", x)), "b": lambda x: order.append(("b", x))}
    samples = time_rounds(calls, fresh, repeats=3, budget_s=float("inf"))
    assert [name for name, _ in order] == ["a", "b"] * 4  # turns, warm-up round included
    assert [x for _, x in order] == list(range(1, 9))  # a fresh argument for every call
    assert {name: len(s) for name, s in samples.items()} == {"a": 3, "b": 3}


def test_spread_is_the_interquartile_range_over_the_median():
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0 / 3.0)
    assert spread([4.0]) == 0.0


@pytest.mark.slow  # exports two graphs and compiles them in two runtimes
def test_quick_run_checks_parity_and_writes_json_and_plot(tmp_path):
    """Run in a process of its own: the runtimes' thread pools would stay in this one
    and can break a later test that forks."""
    for module in ("onnx", "onnxscript", "onnxruntime", "openvino"):
        pytest.importorskip(module)
    args = ["--quick", "--models", "fcos", "--scenarios", "dense", "--regimes", "validation"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.deploy_family", *args, "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = json.loads((tmp_path / "deploy_family.json").read_text())
    assert stored["command"].startswith("python -m benchmarks.deploy_family --quick")
    assert stored["machine"]["cpu"] and stored["machine"]["cpu_capability"]
    assert stored["threads"] == 2 and stored["machine"]["torch_threads"] == 2
    rows = {row["case"]: row for row in stored["rows"]}
    assert set(rows) == {"fcos dense", "yolo validation"}
    for row in rows.values():
        assert row["batch"] == 2 and row["detections"] > 0
        assert set(row["parity"]) == {"onnxruntime", "openvino"}
        for runtime, parity in row["parity"].items():
            assert parity["ok"] and parity["differing"] == 0, (row["case"], runtime, parity)
            assert parity["detections"] == row["detections"]
        assert set(row["median_ms"]) == {"ssd_post", "onnxruntime", "openvino"}
        assert all(len(s) == 2 for s in row["samples_ms"].values())  # --quick: 2 rounds
    assert rows["fcos dense"]["anchors"] == 1364  # 256x256: 32^2 + 16^2 + 8^2 + 4^2 + 2^2
    assert rows["yolo validation"]["anchors"] == 8400
    assert (tmp_path / "deploy_family.png").stat().st_size > 1000
    assert "| fcos dense | 2 |" in proc.stdout  # the docs' table
