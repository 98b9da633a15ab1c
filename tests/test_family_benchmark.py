"""The RetinaNet/FCOS benchmark shapes: ssd_post equals torchvision's loop on them."""

from __future__ import annotations

import pytest

from benchmarks import family


def test_anchor_geometry():
    anchors, level_sizes = family.make_anchors("retinanet")
    assert anchors.shape == (120_087, 4) and len(level_sizes) == 5 and sum(level_sizes) == 120_087
    assert family.make_anchors("fcos")[0].shape == (13_343, 4)


@pytest.mark.parametrize(
    "model, scenario", [("retinanet", "sparse"), ("fcos", "sparse"), ("fcos", "dense")]
)
def test_ssd_post_matches_torchvision_on_benchmark_shapes(model, scenario):
    inp = family.make_inputs(model, scenario, batch=2)
    ours = family.run_ssd_post(inp)
    assert ours.num_detections.sum() > 0
    assert family.same_up_to_ties(ours, family.run_torchvision(inp))


def test_main_records_json_and_plot(tmp_path):
    import json

    results = family.main(
        [
            "--batch",
            "1",
            "--repeats",
            "1",
            "--model",
            "fcos",
            "--scenario",
            "sparse",
            "--out-dir",
            str(tmp_path),
        ]
    )
    stored = json.loads((tmp_path / "family.json").read_text())
    assert stored["rows"] == results["rows"] and len(stored["rows"]) == 1
    row = stored["rows"][0]
    assert (row["model"], row["scenario"], row["batch"], row["parity"]) == (
        "fcos",
        "sparse",
        1,
        "ok",
    )
    assert all(row[f"{m}_s"] > 0 for m in family.METHODS)
    assert stored["command"].startswith("python -m benchmarks.family --batch 1")
    assert (tmp_path / "family.png").stat().st_size > 1000
