"""The benchmark harness in its quick mode: parity holds and the JSON has its shape.

Never asserts a time: the machine is shared and timings are not the point here.
"""
import json
import os

import pytest

from benchmarks import deploy, run

METHODS = ("torchvision", "flatten_nms", "flatten_topk_nms", "ssd_post", "amax", "softmax",
           *deploy.available_runtimes())


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("bench"))
    results = run.main(["--quick", "--repeats", "1", "--out-dir", out_dir])
    return results, out_dir


def test_every_detection_method_matches_torchvision(quick_results):
    results, _ = quick_results
    rows = results["rows"]
    assert {(r["scenario"], r["batch"]) for r in rows} == {("sparse", 1), ("sparse", 2),
                                                           ("dense", 1), ("dense", 2)}
    for r in rows:
        if r["method"] in ("amax", "softmax"):
            assert "parity" not in r
        else:
            assert r["parity"] == "ok", r
            assert r["parity_detail"]["differing"] == 0
        assert r["median_s"] > 0 and len(r["samples_s"]) >= 1


def test_json_files_and_plot_are_written(quick_results):
    results, out_dir = quick_results
    for scenario in ("sparse", "dense"):
        with open(os.path.join(out_dir, f"cpu_{scenario}.json")) as f:
            data = json.load(f)
        assert {"command", "date", "machine", "load_average_start", "rows"} <= set(data)
        assert {r["scenario"] for r in data["rows"]} == {scenario}
        assert {r["method"] for r in data["rows"]} == set(METHODS)
        for r in data["rows"]:
            assert {"model", "batch", "median_s", "samples_s"} <= set(r)
    assert os.path.getsize(os.path.join(out_dir, "cpu.png")) > 0
    assert results["skipped"] == {} or "real" not in [r["scenario"] for r in results["rows"]]


def test_memory_measurement_reports_extra_bytes():
    from benchmarks import memory

    result = memory.measure("sparse", "toy", 2, "softmax")
    assert result is not None
    # softmax allocates its [B, A, C] output: about one logits tensor.
    assert result["logits_bytes"] == 2 * 180 * 11 * 4
    assert result["extra_bytes"] >= 0 and "extra_fraction" in result


def test_gpu_benchmark_code_runs_on_the_cpu(tmp_path):
    """benchmarks.gpu only gets a GPU now and then: its whole path (scenarios,
    parity against torchvision, timing, JSON) runs here on the CPU instead."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--model", "toy", "--batches", "1", "3",
                     "--iters", "1", "--slow-iters", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {(r["scenario"], r["batch"], r["method"]) for r in rows} == {
        (s, b, m) for s in ("sparse", "dense") for b in (1, 3) for m in gpu.GPU_METHODS}
    assert all(r["parity_ok"] and r["median_ms"] > 0 for r in rows)
    assert report["command"].startswith("python -m benchmarks.gpu --device cpu")
