"""Train a detector (SSD, RetinaNet) with PyTorch Lightning; validation is COCO mAP on
ssd_post's detections.

    python train.py --config configs/tiny_shapes.yaml
    python train.py --config configs/ssd300_coco.yaml --data-root /data/coco \
        --devices 8 --strategy ddp

Writes to ``output_dir``: Lightning checkpoints (best by val mAP and last), CSV and
TensorBoard logs, ``detector.pt`` (``models.checkpoint.save_detector`` format) and
``map_curve.png`` (val mAP against epoch and wall time).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from typing import Any, Dict, List, Optional

from training.config import ConfigError, TrainConfig, load_config, parse_override, to_dict


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML file in configs/ (keys: training/config.py)"
    )
    parser.add_argument("--data-root", help="overrides data.root")
    parser.add_argument("--max-epochs", type=int, help="overrides trainer.max_epochs")
    parser.add_argument("--devices", help="overrides trainer.devices (an int, or 'auto')")
    parser.add_argument("--num-nodes", type=int, help="overrides trainer.num_nodes")
    parser.add_argument("--accelerator", help="overrides trainer.accelerator (cpu, gpu, auto)")
    parser.add_argument("--strategy", help="overrides trainer.strategy (auto, ddp, ddp_spawn, ...)")
    parser.add_argument("--output-dir", help="overrides output_dir")
    parser.add_argument("--export", help="overrides export: also save the final detector here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config entry, e.g. --set optim.lr=0.01 (value parsed as YAML)",
    )
    parser.add_argument(
        "--fast-dev-run",
        nargs="?",
        const=1,
        type=int,
        default=0,
        help="run N (default 1) train and val batches, no checkpoints",
    )
    return parser.parse_args(argv)


# Command-line flag (argparse dest) -> the config key it overrides.
FLAG_KEYS = {
    "data_root": "data.root",
    "max_epochs": "trainer.max_epochs",
    "devices": "trainer.devices",
    "num_nodes": "trainer.num_nodes",
    "accelerator": "trainer.accelerator",
    "strategy": "trainer.strategy",
    "output_dir": "output_dir",
    "export": "export",
}


def overrides_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Dotted config key -> value, from the flags and every ``--set`` (later wins)."""
    overrides: Dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is not None:
            # --devices is text so that 'auto' passes; a number is a device count.
            overrides[key] = int(value) if dest == "devices" and value.isdigit() else value
    for item in args.set:
        key, value = parse_override(item)
        overrides[key] = value
    return overrides


def plot_curve(metrics_csv: str, png: str) -> List[Dict[str, float]]:
    """val mAP per validation (epoch, elapsed seconds) from Lightning's CSV log, as a PNG."""
    rows = []
    epoch = 0
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("epoch"):
                epoch = int(float(row["epoch"])) + 1
            if row.get("val/mAP"):
                rows.append(
                    {
                        "epoch": epoch,
                        "mAP": float(row["val/mAP"]),
                        "mAP50": float(row.get("val/mAP50") or "nan"),
                        "elapsed_s": float(row.get("time/elapsed_s") or "nan"),
                    }
                )
    if not rows:
        return rows
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    minutes = [r["elapsed_s"] / 60 for r in rows]
    ax.plot(minutes, [r["mAP"] for r in rows], "o-", label="mAP@[.5:.95]")
    ax.plot(minutes, [r["mAP50"] for r in rows], "s--", label="mAP@.5")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("wall-clock minutes of training (incl. validation)")
    ax.set_ylabel("COCO mAP on shapes val")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return rows


def last_validated_step(trainer) -> int:
    """Global step of the last validation during fit (-1 when none ran)."""
    return int(getattr(trainer.lightning_module, "last_val_step", -1))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config: TrainConfig = load_config(args.config, overrides_from_args(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from models.checkpoint import save_detector
    from training.lightning_module import DetectionDataModule, DetectionLightningModule

    if config.threads:
        torch.set_num_threads(config.threads)
    pl.seed_everything(config.seed, workers=True)
    # The config is checked whole already: building the model cannot fail on a value.
    module = DetectionLightningModule(
        to_dict(config.model), to_dict(config.optim), to_dict(config.loss)
    )
    detector = module.detector
    datamodule = DetectionDataModule(
        config.data, detector.image_size, detector.image_mean, detector.image_std
    )

    output_dir = config.output_dir
    os.makedirs(output_dir, exist_ok=True)
    loggers = [CSVLogger(output_dir, name="logs")]
    try:
        loggers.append(TensorBoardLogger(output_dir, name="tensorboard"))
    except ModuleNotFoundError:
        print("note: tensorboard is not installed; writing CSV logs only", file=sys.stderr)
    checkpoint = ModelCheckpoint(
        dirpath=os.path.join(output_dir, "checkpoints"),
        monitor="val/mAP",
        mode="max",
        save_last=True,
        filename="epoch{epoch:03d}-map{val/mAP:.4f}",
        auto_insert_metric_name=False,
    )
    trainer_cfg = {k: v for k, v in to_dict(config.trainer).items() if v is not None}
    trainer = pl.Trainer(
        default_root_dir=output_dir,
        logger=loggers,
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")],
        fast_dev_run=args.fast_dev_run or False,
        **trainer_cfg,
    )
    trainer.fit(module, datamodule=datamodule)
    if args.fast_dev_run:
        return 0
    if trainer.global_step != last_validated_step(trainer):
        # Training ended between validations (max_time, or epochs not a multiple of
        # check_val_every_n_epoch): measure the weights that get exported.
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if not trainer.is_global_zero:
        return 0
    final = os.path.join(output_dir, "detector.pt")
    save_detector(module.detector, final)
    if config.export:
        save_detector(module.detector, config.export)
    rows = plot_curve(
        os.path.join(loggers[0].log_dir, "metrics.csv"), os.path.join(output_dir, "map_curve.png")
    )
    for row in rows:
        print(
            f"epoch {row['epoch']:3d}  {row['elapsed_s'] / 60:6.2f} min  "
            f"mAP {row['mAP']:.4f}  mAP50 {row['mAP50']:.4f}"
        )
    print(f"total wall clock {time.time() - started:.0f} s; final detector: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
