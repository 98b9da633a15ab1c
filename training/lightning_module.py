"""Lightning wrappers: the detection DataModule and the detector training module.

Both take the sections of a config (``training.config``); the training module takes
them as plain dicts, which Lightning saves as hyperparameters, so a checkpoint
rebuilds it. Defaults and checks are those of :mod:`training.config`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Dict, List, Optional, Tuple, Union

import pytorch_lightning as pl
import torch
from torch import Tensor

from .config import DataConfig, LossConfig, ModelConfig, OptimConfig, section
from .data.coco import CocoDetectionDataset, collate_fn
from .data.shapes import ensure_shapes_dataset
from .data.transforms import eval_transforms, train_transforms
from .evaluation import coco_evaluate, detections_by_image, merge_rank_results


class DetectionDataModule(pl.LightningDataModule):
    """Train / val loaders of the shapes set or any COCO-format set.

    Args:
        data: the ``data`` section of a config (a :class:`~training.config.DataConfig`
            or its dict; missing keys take the defaults there).
        image_size: (h, w) network input.
        mean, std: the model's input normalisation.
    """

    def __init__(
        self,
        data: Union[DataConfig, Dict[str, Any]],
        image_size: Tuple[int, int],
        mean: Tuple[float, ...],
        std: Tuple[float, ...],
    ) -> None:
        super().__init__()
        self.cfg = data if isinstance(data, DataConfig) else section(DataConfig, data, "data")
        self.image_size = tuple(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_dataset: Optional[CocoDetectionDataset] = None
        self.val_dataset: Optional[CocoDetectionDataset] = None

    def paths(self) -> Dict[str, Tuple[str, str]]:
        cfg = self.cfg
        if cfg.kind == "shapes":
            return ensure_shapes_dataset(cfg.root, cfg.seed, cfg.num_train, cfg.num_val)
        return {
            split: (
                os.path.join(cfg.root, getattr(cfg, f"{split}_images")),
                os.path.join(cfg.root, getattr(cfg, f"{split}_ann")),
            )
            for split in ("train", "val")
        }

    def prepare_data(self) -> None:
        # Runs on one process per node: generating here avoids ranks racing on the files.
        self.paths()

    def setup(self, stage: Optional[str] = None) -> None:
        paths = self.paths()
        if stage in ("fit", None) and self.train_dataset is None:
            transform = train_transforms(self.image_size, self.mean, self.std, self.cfg.augment)
            self.train_dataset = self._dataset(*paths["train"], transform)
        if self.val_dataset is None:
            self.val_dataset = self._dataset(
                *paths["val"], eval_transforms(self.image_size, self.mean, self.std)
            )

    def _dataset(self, image_dir: str, ann_file: str, transform) -> CocoDetectionDataset:
        return CocoDetectionDataset(
            image_dir, ann_file, transform, contiguous_labels=self.cfg.contiguous_labels
        )

    def _loader(self, dataset, shuffle: bool) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_fn,
            worker_init_fn=_single_threaded_worker,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_dataset, shuffle=False)


def _single_threaded_worker(worker_id: int) -> None:
    # Loader workers share the CPU with the training process: one thread each.
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def warmup_cosine(
    step: int, total: int, warmup: int, warmup_factor: float, min_ratio: float
) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine to ``min_ratio``."""
    if step < warmup:
        return warmup_factor + (1.0 - warmup_factor) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DetectionLightningModule(pl.LightningModule):
    """Trains a detector of ``models`` with its own loss (SSD: MultiBox; RetinaNet:
    focal loss) and validates with COCO mAP.

    Args:
        model, optim, loss: the sections of a config as dicts (what Lightning saves
            as hyperparameters); checked and completed by :mod:`training.config`.
    """

    def __init__(
        self,
        model: Dict[str, Any],
        optim: Optional[Dict[str, Any]] = None,
        loss: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        from models import build_model  # models/ sits next to training/ in the repository

        self.save_hyperparameters()
        model_cfg = section(ModelConfig, model, "model")
        self.optim_cfg = section(OptimConfig, optim, "optim")
        self.loss_options = dataclasses.asdict(section(LossConfig, loss, "loss"))
        self.detector = build_model(
            model_cfg.arch, model_cfg.num_classes, **model_cfg.build_kwargs()
        )
        self._val_results: Dict[int, List[dict]] = {}  # image id -> COCO results entries
        self._fit_start: Optional[float] = None
        self.last_val_step = -1

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        return self.detector(images)

    def _loss(self, images: Tensor, targets: List[dict]) -> Dict[str, Tensor]:
        # Each architecture owns its loss (SSD: MultiBox; RetinaNet: torchvision's focal loss).
        return self.detector.compute_loss(images, targets, self.loss_options)

    def on_fit_start(self) -> None:
        if self._fit_start is None:  # a validate() after fit keeps measuring from the fit's start
            self._fit_start = time.time()
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "val_dataset", None) or getattr(
            datamodule, "train_dataset", None
        )
        if dataset is not None:
            dataset.check_num_classes(self.detector.num_classes)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self._loss(images, targets)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=images.shape[0])
        self.log_dict(
            {"train/bbox": losses["bbox"], "train/cls": losses["cls"]}, batch_size=images.shape[0]
        )
        return losses["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val_results = {}

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        detections = self.detector.predict(images)
        dataset = self.trainer.datamodule.val_dataset
        self._val_results.update(
            detections_by_image(
                detections, targets, self.detector.image_size, dataset.label_to_category
            )
        )

    def on_validation_epoch_end(self) -> None:
        per_rank: List[Optional[Dict[int, List[dict]]]] = [self._val_results]
        if self.trainer.world_size > 1:
            # Every rank evaluates the union, so all log the same numbers.
            per_rank = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(per_rank, self._val_results)
        # DistributedSampler pads ranks with repeated images: each counts once.
        results, ran = merge_rank_results(per_rank)
        dataset = self.trainer.datamodule.val_dataset
        image_ids = dataset.coco.getImgIds()
        if (
            self.trainer.sanity_checking
            or self.trainer.fast_dev_run
            or self.trainer.limit_val_batches != 1.0
        ) and ran:
            image_ids = ran  # a partial run scores only the images that ran
        stats = coco_evaluate(dataset.coco, results, image_ids)
        self.log("val/mAP", stats["map"], prog_bar=True)
        self.log_dict(
            {
                "val/mAP50": stats["map_50"],
                "val/mAP75": stats["map_75"],
                "val/mAP_small": stats["map_small"],
            }
        )
        if self._fit_start is not None:
            self.log("time/elapsed_s", time.time() - self._fit_start)
        self.last_val_step = int(self.trainer.global_step)
        self._val_results = {}

    def configure_optimizers(self):
        cfg = self.optim_cfg
        # No weight decay on BatchNorm and biases: it only fights the normalisation.
        decay, no_decay = [], []
        for name, param in self.detector.named_parameters():
            if param.requires_grad:
                (no_decay if param.dim() <= 1 else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # optim.name is one of these two: training.config checked it.
        if cfg.name == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(cfg.warmup_steps, total // 2)
        budget = cfg.time_budget_s

        def multiplier(step: int) -> float:
            # On a machine of unknown (or shared) speed a step count cannot promise a
            # wall-clock budget; with time_budget_s the cosine follows whichever of
            # steps or seconds runs out first, so a time-capped run still anneals.
            if budget and self._fit_start is not None and step >= warmup:
                by_time = (time.time() - self._fit_start) / float(budget)
                step = max(step, warmup + int(by_time * (total - warmup)))
            return warmup_cosine(step, total, warmup, cfg.warmup_factor, cfg.min_lr_ratio)

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# The name before RetinaNet training joined. A Lightning checkpoint stores the
# hyperparameters, not the class, so either name loads it; kept for code importing it.
SSDLightningModule = DetectionLightningModule
