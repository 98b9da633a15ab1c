"""COCO mAP of an SSD checkpoint, with the time each stage takes.

    python evaluate.py                                  # the shipped tiny model on shapes val
    python evaluate.py --postprocess torchvision        # same mAP, torchvision's per-image loop
    python evaluate.py --devices 2                      # two CPU processes through Lightning
    python evaluate.py --json out/metrics.json --save-vis out/vis
    python evaluate.py --backend onnxruntime            # network + postprocess exported to ONNX
    python evaluate.py --backend aoti                   # ... by AOTInductor (needs a C++ compiler)

Stages: ``data`` (waiting for the next batch: decoding and resizing images),
``forward`` (the network), ``postprocess`` (the chosen path, the only stage that
differs between ``ssd_post`` and ``torchvision``), ``evaluation`` (mapping boxes to
original pixels, COCO results entries, pycocotools' COCOeval).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ssd_post.formats import write_coco_results
from training.runtime_backends import BACKENDS, build_runtime_backend
from training.config import ConfigError, DataConfig, ModelConfig, TrainConfig, load_config
from models.detector import POSTPROCESSORS, get_postprocess
from training.evaluation import (
    STAGES,
    StageTimer,
    coco_evaluate,
    infer_batch,
    max_over_ranks,
    merge_rank_results,
    run_inference,
    save_visualizations,
)

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
# The shipped model and the config it was trained with: what `python evaluate.py` evaluates.
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "tiny_shapes.yaml")
DEFAULT_CHECKPOINT = os.path.join(REPO_ROOT, "checkpoints", "tiny_shapes.pt")


# Exit status of a run refused for its inputs, as argparse uses for a bad flag.
INPUT_ERROR_EXIT = 2


class EvaluationError(Exception):
    """A problem with the inputs of a run (files, config, checkpoint, data), reported
    as one line without a traceback (exit status 2)."""


def load_run_config(config_path: str, data_root: Optional[str] = None) -> TrainConfig:
    """The config, read and checked by the same schema as train.py's, so both scripts
    accept the same files; ``data_root`` overrides ``data.root``. Problems are
    reported as an EvaluationError."""
    if data_root is not None and os.path.exists(data_root) and not os.path.isdir(data_root):
        raise EvaluationError(f"--data-root: got {data_root!r}, which is a file; allowed: a folder")
    try:
        return load_config(config_path, {"data.root": data_root} if data_root is not None else None)
    except ConfigError as err:
        raise EvaluationError(str(err)) from err


def _int_at_least_one(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` that accepts only a whole number >= 1 and names ``flag`` otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1 or str(value) != text.strip():
            raise argparse.ArgumentTypeError(f"{flag} should be an integer >= 1, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="YAML config the checkpoint was trained with (default: %(default)s)",
    )
    parser.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help="detector checkpoint saved by train.py (default: %(default)s)",
    )
    parser.add_argument(
        "--data-root", default=None, help="data set folder (default: the config's data.root)"
    )
    parser.add_argument(
        "--batch-size",
        type=_int_at_least_one("--batch-size"),
        default=None,
        help="images per batch (default: the config's)",
    )
    parser.add_argument(
        "--postprocess",
        choices=sorted(POSTPROCESSORS),
        default="ssd_post",
        help="ssd_post's batched ops or torchvision's per-image loop (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="pytorch",
        help="where the network and the ssd_post postprocess run: PyTorch, exported to "
        "ONNX and run in onnxruntime / OpenVINO, or compiled into AOTInductor packages "
        "(see docs/deploy.md)",
    )
    parser.add_argument(
        "--json",
        metavar="OUT",
        default=None,
        help="write the metrics to OUT and the detections (COCO results) next to it",
    )
    parser.add_argument(
        "--save-vis",
        metavar="DIR",
        default=None,
        help="write PNGs of images with their detections drawn to DIR",
    )
    parser.add_argument(
        "--vis-limit",
        type=_int_at_least_one("--vis-limit"),
        default=16,
        help="how many images --save-vis draws (default: %(default)s)",
    )
    parser.add_argument(
        "--vis-score",
        type=float,
        default=0.3,
        help="lowest score --save-vis draws (default: %(default)s)",
    )
    parser.add_argument(
        "--devices",
        type=_int_at_least_one("--devices"),
        default=1,
        help="CPU processes; above 1 the run goes through Lightning DDP (default: 1)",
    )
    parser.add_argument(
        "--limit",
        type=_int_at_least_one("--limit"),
        default=None,
        help="evaluate only the first N validation images",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader worker processes (default: the config's data.num_workers)",
    )
    return parser


def load_model(checkpoint: str, model_config: ModelConfig) -> torch.nn.Module:
    """The detector of ``checkpoint`` in eval mode, checked against the config's
    ``arch`` and ``num_classes``; loading never unpickles code (weights_only=True)."""
    from models.checkpoint import load_detector

    if not os.path.isfile(checkpoint):
        raise EvaluationError(
            f"checkpoint file not found: {checkpoint} (train one with `python train.py --config "
            "configs/tiny_shapes.yaml`, or pass --checkpoint)"
        )
    expected = {"arch": model_config.arch, "num_classes": model_config.num_classes}
    try:
        detector = load_detector(checkpoint, expected=expected)
    except ValueError as err:  # a code-running pickle, a mismatch, a damaged stored config
        raise EvaluationError(f"cannot use checkpoint {checkpoint}: {err}") from err
    return detector.eval()


def build_val_dataset(data_config: DataConfig, detector: torch.nn.Module):
    """The validation set exactly as training validates: the same DataModule, so the
    data layout (shapes generated on first use, or COCO folders) and the label
    mapping are defined once. Images are resized and normalised as ``detector``
    expects; a data set whose categories do not fit the detector's classes is
    refused. Returns a ``CocoDetectionDataset``."""
    from training.lightning_module import DetectionDataModule

    try:
        datamodule = DetectionDataModule(
            data_config, detector.image_size, detector.image_mean, detector.image_std
        )
        datamodule.setup("validate")  # builds the val set only
    except (ValueError, OSError) as err:
        raise EvaluationError(f"cannot read the validation set: {err}") from err
    dataset = datamodule.val_dataset
    try:
        dataset.check_num_classes(detector.num_classes)
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    return dataset


def build_loader(dataset, batch_size: int, limit: Optional[int], num_workers: int):
    """A DataLoader over the first ``limit`` images (all when None), in file order."""
    from torch.utils.data import DataLoader, Subset

    from training.data.coco import collate_fn

    subset = Subset(dataset, range(min(limit, len(dataset)))) if limit else dataset
    return DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn
    )


def make_lightning_module(
    detector: torch.nn.Module, postprocess: str, label_to_category: Optional[Dict[int, int]]
):
    """A LightningModule whose predict steps run :func:`infer_batch` and whose epoch
    end gathers every rank's detections and timings into ``module.gathered``.

    Lightning is imported here, not at the top, because the single-process path
    does not need it and the import costs seconds.
    """
    import pytorch_lightning as pl

    class EvaluationModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.detector = detector
            self.postprocess_fn = get_postprocess(postprocess)
            self.label_to_category = label_to_category
            self.timer = StageTimer()
            self.per_image: Dict[int, List[dict]] = {}
            self.gathered: List[Dict[str, Any]] = []

        def on_predict_epoch_start(self) -> None:
            self.anchors = self.detector.anchors()  # [A, 4]
            self.epoch_start = self.batch_end = time.perf_counter()

        def on_predict_batch_start(
            self, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            # Between the end of one step and the start of the next, the loader works.
            self.timer.add("data", time.perf_counter() - self.batch_end)

        def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> int:
            images, targets = batch
            self.per_image.update(
                infer_batch(
                    self.detector,
                    images,
                    targets,
                    self.anchors,
                    self.postprocess_fn,
                    self.timer,
                    self.label_to_category,
                )
            )
            return len(targets)  # not None: Lightning warns about a predict step returning nothing

        def on_predict_batch_end(
            self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            self.batch_end = time.perf_counter()

        def on_predict_epoch_end(self) -> None:
            local = {
                "per_image": self.per_image,
                "seconds": dict(self.timer.seconds),
                "inference_s": time.perf_counter() - self.epoch_start,
            }
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                gathered: List[Any] = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(gathered, local)
                self.gathered = gathered
            else:
                self.gathered = [local]

    return EvaluationModule()


def run_lightning(
    detector: torch.nn.Module,
    loader,
    postprocess: str,
    label_to_category: Optional[Dict[int, int]],
    devices: int,
) -> Tuple[int, List[Dict[int, List[dict]]], Dict[str, float], float]:
    """Inference over ``devices`` CPU processes (DDP) through ``Trainer.predict``.

    With DDP, Lightning starts ranks 1.. by running this script again with the same
    arguments; each rank predicts its shard (an unrepeated distributed sampler) and
    all ranks exchange their detections at epoch end.

    Returns:
        (global rank, per rank: image id -> results, per-stage seconds of the
        slowest rank, inference seconds of the slowest rank).
    """
    import pytorch_lightning as pl

    # Lightning's "GPU available / TPU available" banner says nothing useful on CPU.
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = make_lightning_module(detector, postprocess, label_to_category)
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    per_rank = [rank["per_image"] for rank in module.gathered]
    seconds = max_over_ranks([rank["seconds"] for rank in module.gathered])
    inference_s = max(rank["inference_s"] for rank in module.gathered)
    return trainer.global_rank, per_rank, seconds, inference_s


def format_report(metrics: Dict[str, Any]) -> str:
    """The printed report: COCO's table, per-stage timing and throughput."""
    lines = [
        f"backend={metrics['backend']}  postprocess={metrics['postprocess']}  "
        f"images={metrics['num_images']}  devices={metrics['devices']}  "
        f"checkpoint={metrics['checkpoint']}",
        metrics["summary"],
        "",
        f"{'stage':<12}{'total ms':>12}{'ms / image':>12}",
    ]
    for stage in STAGES:
        lines.append(
            f"{stage:<12}{metrics['timing_ms'][stage]:>12.1f}"
            f"{metrics['timing_ms_per_image'][stage]:>12.3f}"
        )
    lines.append(
        f"images/s: {metrics['images_per_s']:.1f} (data + forward + postprocess); "
        f"postprocess alone: {metrics['postprocess_images_per_s']:.1f} images/s"
    )
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Runs the evaluation described by the parsed ``args``.

    Returns:
        The metrics dict on rank 0 (every process when not distributed); None on the
        other ranks of a distributed run.
    """
    config = load_run_config(args.config, args.data_root)
    batch_size = args.batch_size or config.data.batch_size
    num_workers = args.num_workers if args.num_workers is not None else config.data.num_workers
    if num_workers < 0:
        raise EvaluationError(f"--num-workers should be >= 0, got {num_workers}")
    if not 0.0 <= args.vis_score <= 1.0:
        raise EvaluationError(f"--vis-score should be a score in [0, 1], got {args.vis_score}")
    if config.threads and args.devices == 1:
        torch.set_num_threads(config.threads)  # as train.py does, so timings compare
    detector = load_model(args.checkpoint, config.model)
    dataset = build_val_dataset(config.data, detector)
    loader = build_loader(dataset, batch_size, args.limit, num_workers)
    num_to_evaluate = len(loader.dataset)
    if args.devices > num_to_evaluate:
        # A process with no image would never reach the gather at epoch end and the
        # others would wait for it forever.
        raise EvaluationError(
            f"--devices {args.devices} is more than the {num_to_evaluate} image(s) to evaluate"
        )
    label_to_category = dict(dataset.label_to_category)

    timer = StageTimer()
    if args.backend != "pytorch":
        with tempfile.TemporaryDirectory() as folder:
            runner, postprocess_fn = make_backend(detector, args, folder, batch_size)
            start = time.perf_counter()
            per_rank = [run_inference(runner, loader, postprocess_fn, timer, label_to_category)]
            inference_s = time.perf_counter() - start
    elif args.devices == 1:
        start = time.perf_counter()
        per_rank = [
            run_inference(
                detector, loader, get_postprocess(args.postprocess), timer, label_to_category
            )
        ]
        inference_s = time.perf_counter() - start
    else:
        # Each rank gets its share of the cores; two ranks with all cores each would
        # fight over them and make every stage slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))
        rank, per_rank, seconds, inference_s = run_lightning(
            detector, loader, args.postprocess, label_to_category, args.devices
        )
        if rank != 0:
            return None
        for stage, value in seconds.items():
            timer.add(stage, value)

    results, image_ids = merge_rank_results(per_rank)
    with timer.stage("evaluation"):
        metrics: Dict[str, Any] = coco_evaluate(dataset.coco, results, image_ids)
    num_images = len(image_ids)
    metrics.update(timer.summary(num_images))
    metrics.update(
        postprocess=args.postprocess,
        backend=args.backend,
        num_images=num_images,
        devices=args.devices,
        checkpoint=display_path(args.checkpoint),
        images_per_s=num_images / inference_s if inference_s > 0 else float("inf"),
        postprocess_images_per_s=num_images / max(timer.seconds["postprocess"], 1e-9),
    )
    if args.json:
        write_outputs(args.json, metrics, results)
    if args.save_vis:
        save_visualizations(
            dataset.coco,
            dataset.image_dir,
            results,
            image_ids,
            args.save_vis,
            limit=args.vis_limit,
            score_min=args.vis_score,
        )
    return metrics


def make_backend(detector: torch.nn.Module, args: argparse.Namespace, folder: str, batch_size: int):
    """The exported network and postprocess loaded in ``args.backend`` (files in ``folder``)."""
    if args.postprocess != "ssd_post" or args.devices != 1:
        raise EvaluationError(
            f"--backend {args.backend} runs ssd_post's postprocess in one process; "
            f"got --postprocess {args.postprocess} --devices {args.devices}"
        )
    try:
        return build_runtime_backend(detector, args.backend, folder, max_batch=batch_size)
    except (ImportError, ValueError) as err:
        raise EvaluationError(str(err).splitlines()[0]) from err


def display_path(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the default
    checkpoint), else as given."""
    absolute = os.path.abspath(path)
    if absolute.startswith(REPO_ROOT + os.sep):
        return os.path.relpath(absolute, REPO_ROOT)
    return path


def detections_path(json_out: str) -> str:
    """Where ``--json OUT`` puts the COCO results: ``OUT`` with ``_detections`` before ``.json``."""
    stem, ext = os.path.splitext(json_out)
    return f"{stem}_detections{ext or '.json'}"


def write_outputs(json_out: str, metrics: Dict[str, Any], results: Sequence[dict]) -> None:
    """Writes the metrics json and, next to it, the detections in COCO results format."""
    folder = os.path.dirname(os.path.abspath(json_out))
    os.makedirs(folder, exist_ok=True)
    results_path = detections_path(json_out)
    write_coco_results(results, results_path)
    record = {key: value for key, value in metrics.items() if key != "summary"}
    record["detections"] = results_path
    with open(json_out, "w") as f:
        json.dump(record, f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        metrics = evaluate(args)
    except EvaluationError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return INPUT_ERROR_EXIT
    if metrics is not None:
        print(format_report(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
