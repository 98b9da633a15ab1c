"""SingleStageDetector: backbone + head + anchors, with ssd_post as its postprocess."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import ssd_post
from ssd_post import BoxCoder, DefaultBoxes, Detections, PostprocessConfig
from ssd_post.reference import torchvision_postprocess

PostprocessFn = Callable[..., Detections]
# The postprocess backends a detector (and evaluate.py --postprocess) can run: the
# batched kernels, or torchvision's own per-image loop for comparison. Both take
# (locs[B, A, 4], logits[B, A, C], anchors[A, 4], image_sizes, config, **keywords).
POSTPROCESSORS: Dict[str, PostprocessFn] = {
    "ssd_post": ssd_post.postprocess,
    "torchvision": torchvision_postprocess,
}


def get_postprocess(name: str) -> PostprocessFn:
    """The postprocess function called ``name`` (a key of :data:`POSTPROCESSORS`);
    both return :class:`~ssd_post.Detections`."""
    if name not in POSTPROCESSORS:
        raise ValueError(f"unknown postprocess {name!r}; expected one of {sorted(POSTPROCESSORS)}")
    return POSTPROCESSORS[name]


class SingleStageDetector(nn.Module):
    """A single-stage detector (SSD, RetinaNet) whose inference goes through
    :func:`ssd_post.postprocess`.

    The submodules are named ``backbone`` and ``head`` as in torchvision's ``SSD``, so
    the torchvision-compatible architectures share torchvision's state_dict keys.
    Anchors are not part of the state_dict (torchvision's are not either).

    Args:
        arch: architecture name (see :func:`models.build_model`).
        num_classes: number of logit columns, background (column 0) included.
        image_size: (height, width) of the network input.
        backbone: maps images [B, 3, H, W] to feature maps (a list or an OrderedDict).
        head: maps the list of feature maps to ``{"bbox_regression": [B, A, 4],
            "cls_logits": [B, A, C]}`` (torchvision's ``SSDHead`` contract).
        default_boxes: the anchor generator matching the head's anchors per location,
            ``(image_size, grid_sizes) -> Tensor[A, 4]``; for a per-level
            postprocess it also gives ``level_sizes(grid_sizes)``.
        postprocess_config: thresholds of the postprocess.
        image_mean, image_std: normalisation of [0, 1] RGB pixels the network expects.
        extra_config: architecture arguments stored in :meth:`model_config`.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        image_size: Tuple[int, int],
        backbone: nn.Module,
        head: nn.Module,
        default_boxes: DefaultBoxes,
        postprocess_config: PostprocessConfig,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        extra_config: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = int(num_classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.backbone = backbone
        self.head = head
        self.default_boxes = default_boxes
        self.postprocess_config = postprocess_config
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.extra_config = dict(extra_config or {})
        self._anchors: Optional[Tensor] = None
        self._grid: Optional[List[Tuple[int, int]]] = None

    def features(self, images: Tensor) -> List[Tensor]:
        """Feature maps of the head, in head order."""
        out = self.backbone(images)
        return list(out.values()) if isinstance(out, (dict, OrderedDict)) else list(out)

    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images should be a Tensor[B, 3, H, W], got {shape}")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images should be resized to the network input {self.image_size} (h, w), "
                f"got {tuple(images.shape[-2:])}"
            )

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """Raw head outputs.

        Args:
            images (Tensor[B, 3, H, W]): resized to ``image_size`` and normalised.

        Returns:
            locs (Tensor[B, A, 4]) box regressions and logits (Tensor[B, A, C]).
        """
        self._check_images(images)
        out = self.head(self.features(images))
        return out["bbox_regression"], out["cls_logits"]

    @torch.no_grad()
    def _grid_sizes(self) -> List[Tuple[int, int]]:
        """Feature-map sizes at ``image_size`` (cached: the anchors and the level
        sizes both need them, and finding them costs a forward pass)."""
        if self._grid is None:
            # One dummy pass in eval mode, so BatchNorm statistics are not touched.
            was_training = self.backbone.training
            self.backbone.eval()
            try:
                param = next(self.parameters())
                dummy = torch.zeros(
                    (1, 3) + self.image_size, device=param.device, dtype=param.dtype
                )
                self._grid = [tuple(f.shape[-2:]) for f in self.features(dummy)]
            finally:
                self.backbone.train(was_training)
        return self._grid

    def anchors(self) -> Tensor:
        """Default boxes, Tensor[A, 4] float32 xyxy in network-input pixels (cached, on CPU)."""
        if self._anchors is None:
            self._anchors = self.default_boxes(self.image_size, self._grid_sizes())
        return self._anchors

    def postprocess_inputs(self) -> Dict[str, Any]:
        """The keyword inputs of :func:`ssd_post.postprocess` besides the tensors:
        ``level_sizes`` (anchors per feature level) for a per-level selection
        (RetinaNet), nothing for SSD's per-class one."""
        if self.postprocess_config.selection != "per_level":
            return {}
        return {"level_sizes": self.default_boxes.level_sizes(self._grid_sizes())}

    def compute_loss(
        self, images: Tensor, targets: Sequence[Mapping[str, Tensor]], options: Mapping[str, Any]
    ) -> Dict[str, Tensor]:
        """The SSD MultiBox loss of a batch (:func:`models.multibox.multibox_loss`).

        Args:
            images (Tensor[B, 3, H, W]): the network input.
            targets: per image ``boxes`` (Tensor[n, 4] xyxy input pixels) and ``labels``.
            options: ``iou_thresh`` and ``neg_pos_ratio`` (the ``loss`` config section).

        Returns:
            ``{"bbox", "cls", "loss", ...}`` scalar tensors.
        """
        from .multibox import multibox_loss

        locs, logits = self(images)
        return multibox_loss(
            locs,
            logits,
            self.anchors(),
            targets,
            BoxCoder(self.postprocess_config.box_weights),
            float(options["iou_thresh"]),
            int(options["neg_pos_ratio"]),
        )

    @torch.no_grad()
    def predict(self, images: Tensor, postprocess: str = "ssd_post") -> Detections:
        """Detections of a batch, boxes in network-input pixels.

        The module's mode is left as it is: call ``.eval()`` first for inference.

        Args:
            images (Tensor[B, 3, H, W]): resized to ``image_size`` and normalised.
            postprocess: ``"ssd_post"`` (the batched kernels) or ``"torchvision"``
                (torchvision's own per-image loop, for comparison).

        Returns:
            Detections with boxes [B, K, 4], scores [B, K], labels [B, K], num_detections [B].
        """
        run = get_postprocess(postprocess)
        locs, logits = self(images)
        anchors = self.anchors().to(locs.device)
        sizes = torch.tensor([self.image_size], dtype=torch.int64, device=locs.device).expand(
            locs.shape[0], 2
        )
        return run(
            locs, logits, anchors, sizes, self.postprocess_config, **self.postprocess_inputs()
        )

    def model_config(self) -> Dict[str, Any]:
        """Everything :func:`models.build_model` needs to rebuild this model (plain types only)."""
        config = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "postprocess": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self.postprocess_config).items()
            },
        }
        config.update(self.extra_config)
        return config


# The name before RetinaNet joined; nothing stored refers to it (checkpoints hold a
# model_config and a state_dict, no class), it is kept for code that imports it.
SSDDetector = SingleStageDetector
