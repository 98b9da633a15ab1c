"""evaluate.py and training.evaluation: metrics, timing, box mapping, pictures, CLI errors,
and equal mAP between postprocess paths and between 1 and 2 processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO

from models.detector import get_postprocess
from ssd_post import Detections
from training.evaluation import (
    METRIC_KEYS,
    StageTimer,
    coco_evaluate,
    detections_to_coco,
    draw_detections,
    infer_batch,
    max_over_ranks,
    merge_rank_results,
    run_inference,
    save_visualizations,
    scale_to_original,
)


def make_coco(images, annotations, categories=((1, "circle"), (2, "square"))) -> COCO:
    """An in-memory ground truth: images [(id, h, w)], annotations [(image_id, category, xywh)]."""
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": i, "height": h, "width": w, "file_name": f"{i:06d}.png"} for i, h, w in images
        ],
        "annotations": [
            {
                "id": n + 1,
                "image_id": i,
                "category_id": c,
                "bbox": list(b),
                "area": b[2] * b[3],
                "iscrowd": 0,
            }
            for n, (i, c, b) in enumerate(annotations)
        ],
        "categories": [{"id": c, "name": name} for c, name in categories],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


GT_ANNOTATIONS = [
    (1, 1, (10.0, 10.0, 40.0, 40.0)),
    (1, 2, (60.0, 20.0, 30.0, 50.0)),
    (2, 2, (5.0, 50.0, 80.0, 60.0)),
]


def perfect_results(annotations=GT_ANNOTATIONS):
    return [
        {"image_id": i, "category_id": c, "bbox": list(b), "score": 0.9} for i, c, b in annotations
    ]


# ---------------------------------------------------------------- COCOeval wrapper


def test_coco_evaluate_perfect_detections_score_one():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    metrics = coco_evaluate(coco, perfect_results(), [1, 2])
    assert len(metrics["stats"]) == 12
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["mar_100"] == pytest.approx(1.0)
    for key, index in METRIC_KEYS.items():
        assert metrics[key] == metrics["stats"][index]
    assert "Average Precision" in metrics["summary"]


def test_coco_evaluate_leaves_results_unchanged():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    results = perfect_results()
    before = json.dumps(results)
    coco_evaluate(coco, results, [1, 2])
    assert json.dumps(results) == before  # loadRes would have added area/id/segmentation


def test_coco_evaluate_without_detections_is_zero_not_a_crash():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    metrics = coco_evaluate(coco, [], [1, 2])
    assert metrics["map"] == 0.0
    assert metrics["mar_100"] == 0.0


def test_coco_evaluate_counts_only_the_evaluated_images():
    coco = make_coco([(1, 120, 100), (2, 120, 100)], GT_ANNOTATIONS)
    only_first = [r for r in perfect_results() if r["image_id"] == 1]
    assert coco_evaluate(coco, only_first, [1])["map"] == pytest.approx(1.0)
    # Over both images, image 2's object is missed.
    assert coco_evaluate(coco, only_first, [1, 2])["mar_100"] < 1.0


def test_coco_evaluate_rejects_unknown_and_empty_image_ids():
    coco = make_coco([(1, 120, 100)], GT_ANNOTATIONS[:2])
    with pytest.raises(ValueError, match="not in the annotation file: \\[7\\]"):
        coco_evaluate(coco, [], [1, 7])
    with pytest.raises(ValueError, match="image_ids is empty"):
        coco_evaluate(coco, [], [])


# ---------------------------------------------------------------- mapping to original pixels


def test_scale_to_original_is_orig_over_input_per_axis():
    scale = scale_to_original(torch.tensor([[240, 160], [64, 64]]), (128, 64))
    assert scale.tolist() == [[2.5, 1.875], [1.0, 0.5]]


def test_scale_to_original_rejects_a_bad_input_size():
    with pytest.raises(ValueError, match="input_size should be a positive"):
        scale_to_original(torch.tensor([[10, 10]]), (0, 64))


def test_detections_to_coco_maps_boxes_to_original_pixels_and_categories():
    # One box [8, 16, 24, 48] in a 64x64 network input of an image 128 high, 32 wide.
    detections = Detections(
        boxes=torch.tensor([[[8.0, 16.0, 24.0, 48.0], [0, 0, 0, 0]]]),
        scores=torch.tensor([[0.75, 0.0]]),
        labels=torch.tensor([[1, 0]]),
        num_detections=torch.tensor([1]),
    )
    targets = [{"image_id": torch.tensor(42), "orig_size": torch.tensor([128, 32])}]
    results = detections_to_coco(detections, targets, (64, 64), {1: 7})
    assert results == [
        {"image_id": 42, "category_id": 7, "bbox": [4.0, 32.0, 8.0, 64.0], "score": 0.75}
    ]


def test_detections_to_coco_needs_one_target_per_image():
    detections = Detections(
        torch.zeros(2, 1, 4),
        torch.zeros(2, 1),
        torch.zeros(2, 1, dtype=torch.long),
        torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="one entry per image \\(2\\), got 1"):
        detections_to_coco(detections, [{"image_id": 1, "orig_size": (4, 4)}], (4, 4))


# ---------------------------------------------------------------- timing, gathering, choice


def test_stage_timer_sums_each_stage_and_divides_per_image():
    timer = StageTimer()
    timer.add("forward", 0.5)
    timer.add("forward", 0.25)
    with timer.stage("data"):
        pass
    summary = timer.summary(num_images=3)
    assert summary["timing_ms"]["forward"] == pytest.approx(750.0)
    assert summary["timing_ms_per_image"]["forward"] == pytest.approx(250.0)
    assert set(summary["timing_ms"]) == {"data", "forward", "postprocess", "evaluation"}
    assert summary["timing_ms"]["data"] >= 0.0


def test_stage_timer_rejects_an_unknown_stage():
    timer = StageTimer()
    with pytest.raises(ValueError, match="unknown stage 'backward'"):
        with timer.stage("backward"):
            pass
    with pytest.raises(ValueError, match="unknown stage 'load'"):
        timer.add("load", 1.0)


def test_max_over_ranks_takes_the_slowest_rank_per_stage():
    assert max_over_ranks([{"data": 1.0, "forward": 3.0}, {"data": 2.0, "forward": 1.0}]) == {
        "data": 2.0,
        "forward": 3.0,
    }
    with pytest.raises(ValueError, match="got none"):
        max_over_ranks([])


def test_merge_rank_results_keeps_each_image_once():
    rank0 = {1: [{"image_id": 1, "score": 0.5}], 3: []}
    rank1 = {
        2: [{"image_id": 2, "score": 0.4}],
        1: [{"image_id": 1, "score": 0.5}],
    }  # 1 repeated as padding
    results, image_ids = merge_rank_results([rank0, rank1])
    assert image_ids == [1, 2, 3]
    assert results == [{"image_id": 1, "score": 0.5}, {"image_id": 2, "score": 0.4}]


def test_get_postprocess_names_the_unknown_choice():
    assert callable(get_postprocess("ssd_post")) and callable(get_postprocess("torchvision"))
    with pytest.raises(ValueError, match="unknown postprocess 'fast'; expected one of"):
        get_postprocess("fast")


# ---------------------------------------------------------------- pictures


def test_draw_detections_draws_confident_boxes_only():
    image = Image.new("RGB", (100, 80), (0, 0, 0))
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [20.0, 30.0, 40.0, 30.0], "score": 0.9},
        {"image_id": 1, "category_id": 2, "bbox": [70.0, 5.0, 20.0, 20.0], "score": 0.1},
    ]
    drawn = draw_detections(image, results, {1: "circle", 2: "square"}, score_min=0.3)
    assert drawn.size == image.size
    assert drawn.getpixel((40, 59)) != (0, 0, 0)  # bottom edge of the confident box
    assert drawn.getpixel((80, 24)) == (0, 0, 0)  # the 0.1 box is not drawn
    assert image.getpixel((40, 59)) == (0, 0, 0)  # the input is not drawn on


def test_save_visualizations_writes_one_png_per_image(tmp_path):
    coco = make_coco([(1, 60, 50), (2, 60, 50)], [(1, 1, (5.0, 5.0, 20.0, 20.0))])
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for image_id in (1, 2):
        Image.new("RGB", (50, 60), (30, 30, 30)).save(image_dir / f"{image_id:06d}.png")
    results = [{"image_id": 1, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 20.0], "score": 0.8}]
    written = save_visualizations(
        coco, str(image_dir), results, [1, 2], str(tmp_path / "vis"), limit=1
    )
    assert [os.path.basename(p) for p in written] == ["000001.png"]
    with Image.open(written[0]) as png:
        assert png.size == (50, 60)


# ---------------------------------------------------------------- the evaluate.py script

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# evaluate.py and train.py are scripts at the repository root, not package modules.
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import evaluate  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import save_detector  # noqa: E402

SHIPPED_CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "tiny_shapes.pt")
SHIPPED_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_shapes.yaml")
METRICS_JSON_KEYS = {
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_100",
    "timing_ms",
    "images_per_s",
    "postprocess",
}


def write_config(path, data_root, config=SHIPPED_CONFIG, **model_overrides) -> str:
    """A shipped config (``config``, default tiny_shapes.yaml) with a small shapes set
    (1 train, 24 val images) under data_root.

    Shapes images are a function of (seed, split, index), so these 24 val images are
    the first 24 of the full validation set.
    """
    with open(config) as f:
        config = yaml.safe_load(f)
    config["data"].update(root=str(data_root), num_train=1, num_val=24, num_workers=0)
    config["model"].update(model_overrides)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def small_config(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("evaluate")
    return write_config(folder / "tiny_small.yaml", folder / "shapes")


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory) -> str:
    """The shipped checkpoint when it is there (meaningful detections), else a
    randomly initialised tiny model of the same config."""
    if os.path.isfile(SHIPPED_CHECKPOINT):
        return SHIPPED_CHECKPOINT
    with open(SHIPPED_CONFIG) as f:
        model_config = yaml.safe_load(f)["model"]
    torch.manual_seed(0)
    model = build_model(model_config.pop("arch"), model_config.pop("num_classes"), **model_config)
    path = str(tmp_path_factory.mktemp("checkpoint") / "tiny_random.pt")
    save_detector(model, path)
    return path


def run_main(args, capsys):
    """evaluate.main(args) in this process: (exit code, stdout, stderr)."""
    code = evaluate.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_main_prints_the_summary_timing_and_writes_metrics_and_detections(
    small_config, model_checkpoint, tmp_path, capsys
):
    out_json = tmp_path / "run" / "metrics.json"
    code, out, err = run_main(
        [
            "--config",
            small_config,
            "--checkpoint",
            model_checkpoint,
            "--limit",
            12,
            "--batch-size",
            5,
            "--json",
            out_json,
        ],
        capsys,
    )
    assert code == 0, err
    assert out.count("Average Precision") == 6 and out.count("Average Recall") == 6
    for stage in ("data", "forward", "postprocess", "evaluation"):
        assert f"\n{stage} " in out
    assert "images/s" in out
    metrics = json.loads(out_json.read_text())
    assert METRICS_JSON_KEYS <= set(metrics)
    assert metrics["postprocess"] == "ssd_post" and metrics["num_images"] == 12
    assert set(metrics["timing_ms"]) == {"data", "forward", "postprocess", "evaluation"}
    assert metrics["images_per_s"] > 0
    detections = json.loads((tmp_path / "run" / "metrics_detections.json").read_text())
    assert metrics["detections"] == str(tmp_path / "run" / "metrics_detections.json")
    assert {d["image_id"] for d in detections} <= set(range(1, 13))
    assert all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in detections)


def test_save_vis_writes_pngs(small_config, model_checkpoint, tmp_path, capsys):
    code, _, err = run_main(
        [
            "--config",
            small_config,
            "--checkpoint",
            model_checkpoint,
            "--limit",
            4,
            "--save-vis",
            tmp_path / "vis",
            "--vis-limit",
            3,
        ],
        capsys,
    )
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "vis")) == ["000001.png", "000002.png", "000003.png"]


def test_torchvision_and_ssd_post_postprocess_give_the_same_12_numbers(
    small_config, model_checkpoint, tmp_path, capsys
):
    stats = {}
    for name in ("ssd_post", "torchvision"):
        out_json = tmp_path / f"{name}.json"
        code, _, err = run_main(
            [
                "--config",
                small_config,
                "--checkpoint",
                model_checkpoint,
                "--postprocess",
                name,
                "--json",
                out_json,
            ],
            capsys,
        )
        assert code == 0, err
        metrics = json.loads(out_json.read_text())
        assert metrics["postprocess"] == name
        stats[name] = metrics["stats"]
    assert stats["ssd_post"] == stats["torchvision"]


def test_infer_batch_stages_give_the_detections_of_model_predict(small_config, model_checkpoint):
    config = evaluate.load_run_config(small_config)
    detector = evaluate.load_model(model_checkpoint, config.model)
    dataset = evaluate.build_val_dataset(config.data, detector)
    images, targets = next(iter(evaluate.build_loader(dataset, 4, None, 0)))
    for name in ("ssd_post", "torchvision"):
        per_image = infer_batch(
            detector,
            images,
            targets,
            detector.anchors(),
            get_postprocess(name),
            StageTimer(),
            dataset.label_to_category,
        )
        expected = detections_to_coco(
            detector.predict(images, postprocess=name),
            targets,
            detector.image_size,
            dataset.label_to_category,
        )
        assert [e for i in sorted(per_image) for e in per_image[i]] == expected


def test_lightning_module_on_one_process_equals_the_plain_loop(small_config, model_checkpoint):
    config = evaluate.load_run_config(small_config)
    detector = evaluate.load_model(model_checkpoint, config.model)
    dataset = evaluate.build_val_dataset(config.data, detector)
    loader = evaluate.build_loader(dataset, 5, 11, 0)
    plain = run_inference(
        detector, loader, get_postprocess("ssd_post"), StageTimer(), dataset.label_to_category
    )
    rank, per_rank, seconds, inference_s = evaluate.run_lightning(
        detector, loader, "ssd_post", dataset.label_to_category, devices=1
    )
    assert rank == 0 and len(per_rank) == 1
    assert per_rank[0] == plain
    assert set(seconds) == {"data", "forward", "postprocess", "evaluation"} and inference_s > 0


@pytest.mark.slow
def test_two_processes_give_the_same_map_as_one(small_config, model_checkpoint, tmp_path, capsys):
    common = [
        "--config",
        small_config,
        "--checkpoint",
        model_checkpoint,
        "--limit",
        "15",
        "--batch-size",
        "4",
    ]
    code, _, err = run_main(common + ["--json", tmp_path / "one.json"], capsys)
    assert code == 0, err
    # DDP starts rank 1 by running the script again, so two processes need a real subprocess.
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "evaluate.py"),
            *common,
            "--devices",
            "2",
            "--json",
            str(tmp_path / "two.json"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["devices"], two["devices"]) == (1, 2)
    assert one["num_images"] == two["num_images"] == 15
    assert two["stats"] == one["stats"]


# ---------------------------------------------------------------- errors name what was wrong


def test_missing_checkpoint_file_is_named(small_config, tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    code, _, err = run_main(["--config", small_config, "--checkpoint", missing], capsys)
    assert code == 2
    assert f"checkpoint file not found: {missing}" in err


def test_missing_config_file_is_named(model_checkpoint, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = run_main(["--config", missing, "--checkpoint", model_checkpoint], capsys)
    assert code == 2
    assert f"config file not found: {missing}" in err


@pytest.mark.parametrize(
    "flag, value",
    [("--devices", "0"), ("--devices", "two"), ("--batch-size", "-3"), ("--limit", "1.5")],
)
def test_bad_counts_are_refused_by_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} should be an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_unknown_postprocess_value_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--postprocess", "fast"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--postprocess" in err and "'fast'" in err and "ssd_post" in err and "torchvision" in err


def test_negative_num_workers_is_refused(small_config, model_checkpoint, capsys):
    code, _, err = run_main(
        ["--config", small_config, "--checkpoint", model_checkpoint, "--num-workers", -1], capsys
    )
    assert code == 2 and "--num-workers should be >= 0, got -1" in err


class _RunsCode:
    """Unpickling this would create a folder: the kind of payload weights_only stops."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused(small_config, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "bad.pt"
    torch.save(
        {"model_config": {"arch": "tiny", "num_classes": 5}, "state_dict": _RunsCode(str(marker))},
        bad,
    )
    code, _, err = run_main(["--config", small_config, "--checkpoint", bad], capsys)
    assert code == 2
    assert f"cannot use checkpoint {bad}" in err and "refused to load" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"num_classes": 7}, "num_classes mismatch: checkpoint has 5, expected 7"),
        # null: the arch's own default (tiny's width and input size do not apply to it)
        (
            {"arch": "ssdlite320_mobilenet_v3_large", "width": None, "image_size": None},
            "arch mismatch: checkpoint has 'tiny', expected 'ssdlite320_mobilenet_v3_large'",
        ),
    ],
)
def test_a_checkpoint_of_another_model_names_the_mismatch(
    override, message, model_checkpoint, tmp_path, capsys
):
    config = write_config(tmp_path / "other.yaml", tmp_path / "shapes", **override)
    code, _, err = run_main(["--config", config, "--checkpoint", model_checkpoint], capsys)
    assert code == 2
    assert message in err


def test_out_of_range_vis_score_is_refused(small_config, model_checkpoint, capsys):
    code, _, err = run_main(
        ["--config", small_config, "--checkpoint", model_checkpoint, "--vis-score", 1.5], capsys
    )
    assert code == 2 and "--vis-score should be a score in [0, 1], got 1.5" in err


def test_more_devices_than_images_is_refused_before_any_process_starts(
    small_config, model_checkpoint, capsys
):
    code, _, err = run_main(
        ["--config", small_config, "--checkpoint", model_checkpoint, "--limit", 2, "--devices", 3],
        capsys,
    )
    assert code == 2 and "--devices 3 is more than the 2 image(s) to evaluate" in err


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isfile(SHIPPED_CHECKPOINT),
    reason="checkpoints/tiny_shapes.pt is not trained and committed yet",
)
def test_default_run_evaluates_the_shipped_checkpoint_on_shapes_val_to_map_at_least_half(
    tmp_path_factory, capsys
):
    """`python evaluate.py` as `make run` calls it (in this process), except that the
    generated shapes set goes to a temporary folder instead of the repository's data/."""
    data_root = tmp_path_factory.mktemp("default_run") / "shapes"
    code, out, err = run_main(["--data-root", data_root], capsys)
    assert code == 0, err
    assert "images=500" in out
    first_line = next(line for line in out.splitlines() if "Average Precision" in line)
    assert "IoU=0.50:0.95 | area=   all" in first_line
    assert float(first_line.rsplit("=", 1)[1]) >= 0.5


RETINANET_CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "tiny_shapes_retinanet.pt")
RETINANET_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_shapes_retinanet.yaml")


@pytest.mark.slow  # compiles the network and the postprocess with AOTInductor: minutes
@pytest.mark.skipif(
    not os.path.isfile(RETINANET_CHECKPOINT),
    reason="checkpoints/tiny_shapes_retinanet.pt is not trained and committed yet",
)
def test_shipped_per_level_checkpoint_gives_the_same_12_numbers_in_pytorch_and_aoti(
    tmp_path_factory, capsys
):
    """The per-level RetinaNet checkpoint through evaluate.py on 24 shapes val images:
    its level sizes reach the postprocess in PyTorch and are baked into the
    AOTInductor package, and both give the same COCO table and labels 1..4 only.

    The table, not the bits of every number: the postprocess package is exact, but
    Inductor compiles the network's convolutions into other kernels than eager, so
    the logits differ in their last bits (1e-5, as tests/test_aoti.py says for the
    tiny SSD) and a near-tie between two detections can swap their order."""
    folder = tmp_path_factory.mktemp("retinanet_eval")
    config = write_config(folder / "retinanet_small.yaml", folder / "shapes", RETINANET_CONFIG)
    stats, tables, categories = {}, {}, {}
    for backend in ("pytorch", "aoti"):
        out = folder / f"{backend}.json"
        code, printed, err = run_main(
            ["--config", config, "--checkpoint", RETINANET_CHECKPOINT, "--backend", backend]
            + ["--batch-size", 8, "--json", out],
            capsys,
        )
        assert code == 0, err
        metrics = json.loads(out.read_text())
        assert metrics["backend"] == backend and metrics["num_images"] == 24
        stats[backend] = metrics["stats"]
        tables[backend] = [line for line in printed.splitlines() if "Average" in line]
        with open(evaluate.detections_path(str(out))) as f:
            categories[backend] = {entry["category_id"] for entry in json.load(f)}
    assert stats["pytorch"][0] > 0.2  # a trained model: something to agree on
    assert len(tables["pytorch"]) == 12 and tables["aoti"] == tables["pytorch"]
    torch.testing.assert_close(
        torch.tensor(stats["aoti"]), torch.tensor(stats["pytorch"]), rtol=0, atol=1e-4
    )
    # Column 0 is never a positive in training, so it never scores above the threshold.
    assert categories["pytorch"] == categories["aoti"] == {1, 2, 3, 4}


def _assert_one_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]


def _coco_set(root, categories):
    """A two-image COCO-format val set under ``root`` with the given category ids."""
    os.makedirs(root / "val", exist_ok=True)
    images, annotations = [], []
    for image_id in (1, 2):
        Image.new("RGB", (40, 30), (90, 120, 150)).save(root / "val" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 40, "height": 30})
        annotations.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": categories[0],
                "bbox": [5, 5, 10, 10],
                "area": 100,
                "iscrowd": 0,
            }
        )
    (root / "val.json").write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c, "name": f"thing{c}"} for c in categories],
            }
        )
    )


def _coco_config(tmp_path, contiguous_labels=True) -> str:
    with open(SHIPPED_CONFIG) as f:
        config = yaml.safe_load(f)
    config["data"] = {
        "kind": "coco",
        "root": str(tmp_path / "coco"),
        "val_images": "val",
        "val_ann": "val.json",
        "num_workers": 0,
        "contiguous_labels": contiguous_labels,
    }
    path = tmp_path / "coco.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_model_whose_classes_do_not_fit_the_json_categories_is_refused(
    model_checkpoint, tmp_path, capsys
):
    """A 5-class model (4 shapes) against a COCO json with 2 categories: refused, not scored."""
    _coco_set(tmp_path / "coco", categories=[1, 2])
    code, out, err = run_main(
        ["--config", _coco_config(tmp_path), "--checkpoint", model_checkpoint], capsys
    )
    assert code == 2 and "Average Precision" not in out
    _assert_one_line(err, "num_classes is 5", "has 2 categories", "needs 3 classes")


def test_category_ids_that_do_not_map_to_model_labels_are_refused(
    model_checkpoint, tmp_path, capsys
):
    """Labels = category ids (no contiguous mapping): id 9 is past the model's 5 columns."""
    _coco_set(tmp_path / "coco", categories=[1, 9])
    code, _, err = run_main(
        [
            "--config",
            _coco_config(tmp_path, contiguous_labels=False),
            "--checkpoint",
            model_checkpoint,
        ],
        capsys,
    )
    assert code == 2
    _assert_one_line(err, "num_classes is 5", "ids [1, 9]", "needs 10 classes")


def test_data_root_that_is_a_file_is_refused(small_config, model_checkpoint, tmp_path, capsys):
    a_file = tmp_path / "not_a_folder.txt"
    a_file.write_text("x")
    code, _, err = run_main(
        ["--config", small_config, "--checkpoint", model_checkpoint, "--data-root", a_file], capsys
    )
    assert code == 2
    _assert_one_line(err, "--data-root", str(a_file), "a folder")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("width", None, "width should be an even int >= 4, got None"),
        ("image_size", [32, "x"], "image_size should be (h, w), two ints, got [32, 'x']"),
        ("postprocess", {"score_thresh": "high"}, "score_thresh"),
    ],
)
def test_a_checkpoint_with_a_tampered_model_config_names_the_field(
    field, value, message, small_config, model_checkpoint, tmp_path, capsys
):
    data = torch.load(model_checkpoint, weights_only=True)
    data["model_config"][field] = value
    tampered = tmp_path / "tampered.pt"
    torch.save(data, tampered)
    code, _, err = run_main(["--config", small_config, "--checkpoint", tampered], capsys)
    assert code == 2
    _assert_one_line(err, str(tampered), "model_config is invalid", message)


def test_a_bad_config_value_is_one_line_with_exit_2(model_checkpoint, tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", tmp_path / "shapes")
    data = yaml.safe_load(open(config))
    data["data"]["batch_size"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    code, _, err = run_main(["--config", config, "--checkpoint", model_checkpoint], capsys)
    assert code == 2
    _assert_one_line(err, "data.batch_size: got 0; allowed: an integer >= 1")
