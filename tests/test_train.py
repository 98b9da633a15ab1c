"""train.py and the Lightning modules: fast-dev-runs (single process and 2-process
DDP on CPU with gloo), outputs of a short run, config errors, the LR schedule."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
import yaml

import train
from models.checkpoint import load_detector
from training.config import AugmentConfig, ConfigError, OptimConfig, load_config
from training import lightning_module
from training.lightning_module import DetectionLightningModule, warmup_cosine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(tmp_path, **trainer):
    config = {
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "threads": 1,
        "model": {"arch": "tiny", "num_classes": 5, "image_size": [64, 64], "width": 8},
        "data": {
            "kind": "shapes",
            "root": str(tmp_path.parent / "shapes_tiny"),
            "num_train": 8,
            "num_val": 4,
            "batch_size": 4,
            "num_workers": 0,
        },
        "optim": {"name": "sgd", "lr": 0.01, "warmup_steps": 2},
        "trainer": {
            "max_epochs": 1,
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
            **trainer,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fast_dev_run(tmp_path):
    assert train.main(["--config", _config(tmp_path), "--fast-dev-run"]) == 0


def test_short_run_writes_checkpoints_logs_curve_and_detector(tmp_path):
    export = tmp_path / "exported" / "tiny.pt"
    code = train.main(
        [
            "--config",
            _config(tmp_path, limit_train_batches=2),
            "--max-epochs",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
            "--export",
            str(export),
            "--set",
            "optim.time_budget_s=600",
            "--set",
            "trainer.check_val_every_n_epoch=3",
        ]
    )
    assert code == 0
    run = tmp_path / "run"
    assert (run / "map_curve.png").stat().st_size > 0
    assert "last.ckpt" in os.listdir(run / "checkpoints")
    with open(run / "logs" / "version_0" / "metrics.csv") as f:
        maps = [float(r["val/mAP"]) for r in csv.DictReader(f) if r.get("val/mAP")]
    # No validation falls inside the 2 epochs: the final weights are still measured once.
    assert len(maps) == 1 and all(0.0 <= m <= 1.0 for m in maps)
    model = load_detector(str(export), expected={"arch": "tiny", "num_classes": 5})
    assert model.image_size == (64, 64)
    assert load_detector(str(run / "detector.pt")).model_config() == model.model_config()


@pytest.mark.slow
def test_ddp_two_process_cpu_fast_dev_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            "--config",
            _config(tmp_path),
            "--devices",
            "2",
            "--strategy",
            "ddp",
            "--accelerator",
            "cpu",
            "--fast-dev-run",
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1" in log or "distributed_backend=gloo" in log


def test_unknown_config_key_is_named(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "tiny", "num_classes": 5}, "optimiser": {}}))
    assert train.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "optimiser" in err
    path.write_text(
        yaml.safe_dump({"model": {"arch": "tiny", "num_classes": 5}, "trainer": {"epochs": 3}})
    )
    assert train.main(["--config", str(path)]) == 2
    assert "epochs" in capsys.readouterr().err
    path.write_text(
        yaml.safe_dump({"model": {"arch": "tiny", "num_classes": 5}, "data": {"batchsize": 3}})
    )
    assert train.main(["--config", str(path)]) == 2
    assert "batchsize" in capsys.readouterr().err
    good = _config(tmp_path)
    assert train.main(["--config", good, "--set", "optim.lrr=0.1"]) == 2
    assert "lrr" in capsys.readouterr().err
    assert train.main(["--config", good, "--set", "trainer.epochs=3"]) == 2
    assert "epochs" in capsys.readouterr().err
    assert train.main(["--config", good, "--set", "no_equals_sign"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    path.write_text("model: [unclosed")
    assert train.main(["--config", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


# Issue 13's bad values, each as a file entry and as an override: one line on stderr
# naming the key, the value and what is allowed; exit status 2; nothing trained.
BAD_VALUES = [
    ("optim", "lr", -0.1, "a number > 0"),
    ("optim", "lr", "abc", "a number"),
    ("data", "batch_size", 0, "an integer >= 1"),
    ("trainer", "max_epochs", -3, "an integer >= 1"),
    ("optim", "name", "adam", "one of ['sgd', 'adamw']"),
    ("data", "num_workers", 1.5, "an integer"),
    ("model", "width", 3, "even int >= 4"),
    ("model", "arch", "resnet", "unknown arch 'resnet'"),
    ("data", "augment", {"flip_p": 2.0}, "a number in [0, 1]"),
]


def _assert_one_line_error(code, err, key, allowed):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and allowed in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("section, key, value, allowed", BAD_VALUES)
def test_bad_value_in_the_file_is_one_line_naming_the_key(
    section, key, value, allowed, tmp_path, capsys
):
    config = yaml.safe_load(open(_config(tmp_path)))
    config[section][key] = value
    path = tmp_path / "bad_value.yaml"
    path.write_text(yaml.safe_dump(config))
    code = train.main(["--config", str(path)])
    _assert_one_line_error(
        code,
        capsys.readouterr().err,
        section if section == "model" else f"{section}.{key}",
        allowed,
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section, key, value, allowed", BAD_VALUES[:5])
def test_bad_value_given_by_set_is_one_line_naming_the_key(
    section, key, value, allowed, tmp_path, capsys
):
    code = train.main(["--config", _config(tmp_path), "--set", f"{section}.{key}={value}"])
    _assert_one_line_error(code, capsys.readouterr().err, f"{section}.{key}", allowed)


def test_bad_values_from_the_command_line_exit_2_in_a_subprocess(tmp_path):
    """As a user runs it: the process exits 2 with one line, not a traceback."""
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "train.py"),
            "--config",
            _config(tmp_path),
            "--max-epochs",
            "-1",
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _assert_one_line_error(
        result.returncode, result.stderr, "trainer.max_epochs", "an integer >= 1"
    )


def test_defaults_and_overrides_land_in_the_typed_config(tmp_path):
    config = load_config(_config(tmp_path), {"optim.lr": "1e-3", "trainer.devices": 2})
    assert config.optim.lr == pytest.approx(1e-3)  # PyYAML reads 1e-3 as text: still a number
    assert config.trainer.devices == 2
    assert config.optim.momentum == OptimConfig().momentum  # not in the file: the schema's default
    assert config.data.augment == AugmentConfig()
    with pytest.raises(ConfigError, match=r"optim\.lr: got 'abc'; allowed: a number"):
        load_config(_config(tmp_path), {"optim.lr": "abc"})


def test_class_count_mismatch_with_data_is_named(tmp_path):
    config = yaml.safe_load(open(_config(tmp_path)))
    config["model"]["num_classes"] = 7
    path = tmp_path / "mismatch.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="num_classes is 7 .* needs 5 classes"):
        train.main(["--config", str(path), "--fast-dev-run"])


def test_shipped_configs_parse():
    archs = {
        "tiny_shapes.yaml": "tiny",
        "tiny_shapes_retinanet.yaml": "tiny_retinanet",
        "ssd300_coco.yaml": "ssd300_vgg16",
        "ssdlite320_coco.yaml": "ssdlite320_mobilenet_v3_large",
        "retinanet_coco.yaml": "retinanet_resnet50_fpn",
    }
    assert sorted(os.listdir(os.path.join(REPO, "configs"))) == sorted(archs)
    for name, arch in archs.items():
        config = load_config(os.path.join(REPO, "configs", name))
        assert config.model.arch == arch


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.01, 0.0) == pytest.approx(0.01)
    assert warmup_cosine(10, 100, 10, 0.01, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.01, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 0.01, 0.05) == pytest.approx(0.05)


def test_loss_falls_when_fitting_one_batch():
    torch.manual_seed(0)
    module = DetectionLightningModule(
        {"arch": "tiny", "num_classes": 3, "image_size": [64, 64], "width": 8}
    )
    detector = module.detector.train()
    images = torch.randn(2, 3, 64, 64)
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[30.0, 20.0, 60.0, 50.0], [2.0, 40.0, 12.0, 50.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    optimizer = torch.optim.Adam(detector.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = module._loss(images, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "model, message",
    [
        ({"num_classes": 5}, "model.arch: missing"),
        ({"arch": "tiny"}, "model.num_classes: missing"),
    ],
)
def test_a_missing_required_model_key_is_named(model, message, tmp_path, capsys):
    path = tmp_path / "partial.yaml"
    path.write_text(yaml.safe_dump({"model": model}))
    assert train.main(["--config", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_max_time_format_is_checked(tmp_path, capsys):
    assert train.main(["--config", _config(tmp_path), "--set", "trainer.max_time=12 minutes"]) == 2
    assert "trainer.max_time: got '12 minutes'; allowed: \"DD:HH:MM:SS\"" in capsys.readouterr().err


@pytest.mark.slow  # ResNet-50 FPN through Lightning
def test_retinanet_trains_and_validates_through_train_py(tmp_path):
    # The RetinaNet arch goes through the same Lightning path as SSD: its own loss,
    # the per-level postprocess in validation, a detector saved and reloaded.
    config = yaml.safe_load(open(_config(tmp_path)))
    config["model"] = {"arch": "retinanet_resnet50_fpn", "num_classes": 5, "image_size": [64, 64]}
    config["loss"] = {"iou_thresh": 0.5, "bg_iou_thresh": 0.4}
    config["data"]["batch_size"] = 2
    path = tmp_path / "retinanet.yaml"
    path.write_text(yaml.safe_dump(config))
    export = tmp_path / "retinanet.pt"
    code = train.main(
        [
            "--config",
            str(path),
            "--max-epochs",
            "1",
            "--export",
            str(export),
            "--set",
            "trainer.limit_train_batches=1",
            "--set",
            "trainer.limit_val_batches=1",
        ]
    )
    assert code == 0
    from models.checkpoint import load_detector

    detector = load_detector(str(export)).eval()
    assert detector.arch == "retinanet_resnet50_fpn"
    detections = detector.predict(torch.zeros(1, 3, 64, 64))
    assert detections.boxes.shape[:2] == (
        1,
        detector.postprocess_config.padded_detections(detector.anchors().shape[0], 5),
    )


def test_former_lightning_module_name_is_an_alias():
    assert lightning_module.SSDLightningModule is DetectionLightningModule
