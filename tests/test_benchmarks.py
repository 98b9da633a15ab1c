"""The benchmark harness in its quick mode: parity holds and the JSON has its shape.

Never asserts a time: the machine is shared and timings are not the point here.
"""

import json
import os

import pytest
import torch

from benchmarks import deploy, run

# The harness runs every method with repeats, in subprocesses for memory: slow.
pytestmark = pytest.mark.slow

METHODS = (
    "torchvision",
    "flatten_nms",
    "flatten_topk_nms",
    "ssd_post",
    "amax",
    "softmax",
    *deploy.available_runtimes(),
)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("bench"))
    results = run.main(["--quick", "--repeats", "1", "--out-dir", out_dir])
    return results, out_dir


def test_every_detection_method_matches_torchvision(quick_results):
    results, _ = quick_results
    rows = results["rows"]
    assert {(r["scenario"], r["batch"]) for r in rows} == {
        ("sparse", 1),
        ("sparse", 2),
        ("dense", 1),
        ("dense", 2),
    }
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
    # --quick asks for the synthetic scenarios only: nothing was skipped.
    assert results["skipped"] == {}


def test_real_scenario_without_its_checkpoint_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints/tiny_shapes.pt is looked up relative to here
    results = run.main(
        ["--quick", "--scenarios", "real", "--repeats", "1", "--out-dir", str(tmp_path / "out")]
    )
    assert results["rows"] == []
    assert "tiny_shapes.pt not found" in results["skipped"]["real"]


def test_memory_measurement_reports_extra_bytes():
    from benchmarks import memory

    # SSD300-sized logits (6.4 MB), far above the page granularity of the RSS numbers.
    softmax = memory.measure("dense", "ssd300", 2, "softmax")
    amax = memory.measure("dense", "ssd300", 2, "amax")
    assert softmax is not None and amax is not None
    assert softmax["logits_bytes"] == 2 * 8732 * 91 * 4
    # softmax allocates its [B, A, C] output: about one logits tensor; amax only [B, A].
    assert 0.9 <= softmax["extra_fraction"] <= 1.5, softmax
    assert amax["extra_fraction"] < 0.5, amax
    assert softmax["extra_fraction"] == softmax["extra_bytes"] / softmax["logits_bytes"]


def test_gpu_benchmark_code_runs_on_the_cpu(tmp_path):
    """benchmarks.gpu only gets a GPU now and then: its whole path (scenarios,
    parity against torchvision, timing, JSON) runs here on the CPU instead."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert (
        gpu.main(
            [
                "--device",
                "cpu",
                "--model",
                "toy",
                "--batches",
                "1",
                "3",
                "--iters",
                "1",
                "--slow-iters",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {(r["scenario"], r["batch"], r["method"]) for r in rows} == {
        (s, b, m) for s in ("sparse", "dense") for b in (1, 3) for m in gpu.GPU_METHODS
    }
    assert all(r["parity_ok"] and r["median_ms"] > 0 for r in rows)
    assert report["command"].startswith("python -m benchmarks.gpu --device cpu")


def test_real_inputs_use_the_models_own_normalisation(tmp_path):
    """The tiny model expects (x - 0.5) / 0.25, not ImageNet's mean and std."""
    import numpy as np

    from benchmarks.real import model_input_images
    from models import build_model
    from training.data.coco import CocoDetectionDataset
    from training.data.shapes import ensure_shapes_dataset

    model = build_model("tiny", 5, width=8, image_size=[64, 64])
    image_dir, ann_file = ensure_shapes_dataset(str(tmp_path / "shapes"), 0, 1, 2)["val"]
    images = model_input_images(model, image_dir, ann_file, batch=3)
    assert images.shape == (3, 3, 64, 64)
    raw, _ = CocoDetectionDataset(image_dir, ann_file, verbose=False)[
        0
    ]  # float [0, 1], original size
    resized = torch.nn.functional.interpolate(
        raw[None], size=(64, 64), mode="bilinear", antialias=False
    )[0]
    mean = torch.tensor(model.image_mean).view(3, 1, 1)
    std = torch.tensor(model.image_std).view(3, 1, 1)
    # Resize methods differ (OpenCV vs torch); the channel means tell the normalisation apart.
    expected = ((resized - mean) / std).mean(dim=(1, 2))
    torch.testing.assert_close(images[0].mean(dim=(1, 2)), expected, atol=0.05, rtol=0)
    torch.testing.assert_close(images[2], images[0])  # batch 3 from 2 images: reused in order
    assert np.isfinite(images.numpy()).all()


def test_nms_benchmark_checks_max_kept_and_writes_json(tmp_path):
    from benchmarks import nms

    out = tmp_path / "nms.json"
    result = nms.main(["--boxes", "2000", "--max-kept", "50", "--repeats", "1", "--out", str(out)])
    stored = json.loads(out.read_text())
    assert stored["boxes"] == 2000 and stored["max_kept"] == 50
    assert {"sort", "numpy_sort", "batched_nms_max_kept", "batched_nms_full"} <= set(
        stored["median_ms"]
    )
    assert stored["survivors_full"] == result["survivors_full"] > 50
