"""The YOLOv8 benchmark (benchmarks/yolo.py): its shapes give the loop's detections,
and a short run records both regimes as JSON and a plot."""

from __future__ import annotations

import json
import os

from benchmarks import yolo


def test_short_run_records_parity_json_and_plot(tmp_path):
    out = os.path.join(tmp_path, "yolo.json")
    result = yolo.main(["--batch", "2", "--repeats", "1", "--budget-s", "0.5", "--out", out])
    assert set(result["regimes"]) == {"validation", "prediction"}
    for entry in result["regimes"].values():
        assert entry["differ_from_loop"] == 0
        assert entry["detections"] > 0
        assert set(entry["median_ms"]) >= {"class_scores_read", "ssd_post", "offset_loop"}
    assert json.load(open(out))["batch"] == 2
    assert os.path.getsize(os.path.join(tmp_path, "yolo.png")) > 0
