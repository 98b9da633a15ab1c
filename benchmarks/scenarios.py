"""Seeded synthetic head outputs with the shapes of real SSD detectors.

Two confidence regimes bracket what a postprocess meets in practice:

* ``sparse``: a trained model. The background logit dominates almost every anchor,
  so only the anchors that overlap one of a few objects score a class above the
  threshold, and their regressions point at that object (NMS has real overlaps).
* ``dense``: an early or noisy model. Logits are moderate noise with a weak
  background, so thousands of anchors per class pass score_thresh = 0.01 and the
  per-class top-k and NMS run at full size.

The ``real`` scenario (the trained tiny model on the shapes data) lives in
``benchmarks.real`` because it needs a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ssd_post.anchors import DefaultBoxes
from ssd_post.box_coder import BoxCoder
from ssd_post.config import PostprocessConfig


@dataclass(frozen=True)
class Model:
    """The head geometry and postprocess defaults of one detector."""

    name: str
    image_size: int
    num_classes: int  # background included
    make_anchors: Callable[[], Tensor]
    config: PostprocessConfig


def _ssd300_anchors() -> Tensor:
    return DefaultBoxes.ssd300()((300, 300), [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)])


def _ssdlite320_anchors() -> Tensor:
    return DefaultBoxes.ssdlite320()(
        (320, 320), [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    )


def _toy_anchors() -> Tensor:
    return DefaultBoxes([[2], [2]], min_ratio=0.2, max_ratio=0.9)((96, 96), [(6, 6), (3, 3)])


# Postprocess settings are torchvision's for each model (ssd300_vgg16 and
# ssdlite320_mobilenet_v3_large), so the baseline runs as users run it.
MODELS: Dict[str, Model] = {
    "ssd300": Model(
        "ssd300",
        300,
        91,
        _ssd300_anchors,
        PostprocessConfig(
            score_thresh=0.01, nms_thresh=0.45, topk_candidates=400, detections_per_img=200
        ),
    ),
    "ssdlite320": Model(
        "ssdlite320",
        320,
        91,
        _ssdlite320_anchors,
        PostprocessConfig(
            score_thresh=0.001, nms_thresh=0.55, topk_candidates=300, detections_per_img=300
        ),
    ),
    # 180 anchors, 11 classes: for smoke runs and tests, not for numbers.
    "toy": Model("toy", 96, 11, _toy_anchors, PostprocessConfig(detections_per_img=50)),
}


@dataclass
class Inputs:
    """One batch of head outputs plus everything a postprocess needs beside them."""

    locs: Tensor  # [B, A, 4]
    logits: Tensor  # [B, A, C]
    anchors: Tensor  # [A, 4]
    image_sizes: Tensor  # [B, 2] int64 (h, w)
    config: PostprocessConfig

    @property
    def batch(self) -> int:
        return self.logits.shape[0]


def _sparse_image(anchors: Tensor, model: Model, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    num_anchors, num_classes = anchors.shape[0], model.num_classes
    coder = BoxCoder(model.config.box_weights)
    # Background: confident everywhere; foreground: unit noise well below it.
    logits = torch.randn(num_anchors, num_classes, generator=gen)
    logits[:, 0] = 9.0 + torch.randn(num_anchors, generator=gen)
    locs = 0.5 * torch.randn(num_anchors, 4, generator=gen)
    num_objects = int(torch.randint(2, 9, (1,), generator=gen))
    size = model.image_size
    for _ in range(num_objects):
        wh = size * (0.08 + 0.6 * torch.rand(2, generator=gen))
        centre = wh / 2 + (size - wh) * torch.rand(2, generator=gen)
        box = torch.cat((centre - wh / 2, centre + wh / 2))
        iou = box_iou(anchors, box[None])[:, 0]  # [A]
        hit = torch.nonzero(iou > 0.3).flatten()
        if hit.numel() == 0:
            hit = iou.argmax().reshape(1)
        label = int(torch.randint(1, num_classes, (1,), generator=gen))
        confusable = int(torch.randint(1, num_classes, (1,), generator=gen))
        # The better an anchor overlaps, the surer the model; a confusable class
        # gets some mass too, as trained detectors give.
        strength = 4.0 + 8.0 * iou[hit] + torch.randn(hit.numel(), generator=gen)
        logits[hit, 0] = 2.0 + torch.randn(hit.numel(), generator=gen)
        logits[hit, label] = strength
        logits[hit, confusable] = strength - 3.0 + torch.randn(hit.numel(), generator=gen)
        target = coder.encode(box.expand(hit.numel(), 4), anchors[hit])
        locs[hit] = target + 0.2 * torch.randn(hit.numel(), 4, generator=gen)
    return locs, logits


def _dense_image(anchors: Tensor, model: Model, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    num_anchors, num_classes = anchors.shape[0], model.num_classes
    # Unit noise on every class with a background no stronger than the rest: a
    # softmax over 91 such logits puts about a third of the classes above 0.01.
    logits = torch.randn(num_anchors, num_classes, generator=gen)
    locs = 0.7 * torch.randn(num_anchors, 4, generator=gen)
    return locs, logits


SCENARIOS = {"sparse": _sparse_image, "dense": _dense_image}


def make_inputs(scenario: str, model_name: str, batch: int, seed: int = 0) -> Inputs:
    """Head outputs of ``batch`` images; the same arguments give the same tensors."""
    model = MODELS[model_name]
    anchors = model.make_anchors()
    gen = torch.Generator().manual_seed(seed)
    per_image = [SCENARIOS[scenario](anchors, model, gen) for _ in range(batch)]
    locs = torch.stack([p[0] for p in per_image])
    logits = torch.stack([p[1] for p in per_image])
    del per_image
    sizes = torch.full((batch, 2), model.image_size, dtype=torch.int64)
    return Inputs(locs.contiguous(), logits.contiguous(), anchors, sizes, model.config)
