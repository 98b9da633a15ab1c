"""torchvision's SSD, SSDLite, RetinaNet and FCOS as exportable modules.

:class:`TorchvisionDetectorModule` is ``model(list(images))`` of a torchvision
detector in eval mode, for images of one size fixed at export, written as one graph
of tensors in and the five padded detection tensors out:

    images [B, 3, H, W] in [0, 1]
      -> (x - image_mean) / image_std                 GeneralizedRCNNTransform.normalize
      -> F.interpolate(bilinear), the transform's     ... .resize (eval: min_size[-1],
         own arguments for an (H, W) image                max_size; SSD: fixed_size)
      -> zero padding to size_divisible               ... .batch_images
      -> backbone, head; per-level outputs are already concatenated by the heads
      -> ssd_post.postprocess(PostprocessConfig.from_torchvision(model)), anchors
         and level sizes computed once at export (they only depend on the size)
      -> boxes times (H / h, W / w)                   GeneralizedRCNNTransform.postprocess

Every size is known at export, so nothing in the graph depends on the data but the
batch. Images of another size need another export (torchvision would resize them to
another size, with other anchors).

Importing :mod:`ssd_post` does not import this module; it imports torchvision.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PostprocessConfig
from .exportable import _as_tuple, check_example_images
from .postprocess import postprocess

__all__ = ["TorchvisionDetectorModule", "check_torchvision_detector"]


def check_torchvision_detector(model: Any) -> None:
    """Raises ValueError unless ``model`` is a torchvision SSD (SSDLite included),
    RetinaNet or FCOS in eval mode with torchvision's own GeneralizedRCNNTransform."""
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    if not isinstance(model, (SSD, RetinaNet, FCOS)):
        raise ValueError(
            f"model should be a torchvision SSD, SSDLite, RetinaNet or FCOS, "
            f"got {type(model).__name__}"
        )
    if model.training:
        raise ValueError(
            f"the torchvision {type(model).__name__} is in training mode (it would return "
            "losses, not detections): call model.eval() before exporting it"
        )
    if not isinstance(model.transform, GeneralizedRCNNTransform):
        raise ValueError(
            "model.transform should be torchvision's GeneralizedRCNNTransform (its resize "
            f"is reproduced at export), got {type(model.transform).__name__}"
        )


def resize_arguments(transform: nn.Module, size: Tuple[int, int]) -> Dict[str, Any]:
    """The keyword arguments of the ``F.interpolate`` call with which torchvision's
    GeneralizedRCNNTransform, in eval mode, resizes an image of ``size`` (h, w)
    (``_resize_image_and_masks``): a fixed output size (SSD), or the scale that
    brings the short side to ``min_size[-1]`` with the long side at most
    ``max_size``, the output size recomputed from it."""
    if transform.fixed_size is not None:
        # torchvision's fixed_size is (w, h); interpolate takes (h, w).
        return {
            "size": [transform.fixed_size[1], transform.fixed_size[0]],
            "scale_factor": None,
            "recompute_scale_factor": None,
        }
    # The same Python float arithmetic as torchvision's, so the same scale.
    scale = min(transform.min_size[-1] / min(size), transform.max_size / max(size))
    return {"size": None, "scale_factor": scale, "recompute_scale_factor": True}


def padded_size(size: Tuple[int, int], size_divisible: int) -> Tuple[int, int]:
    """(h, w) rounded up to multiples of ``size_divisible`` as torchvision's
    ``batch_images`` rounds them (in floats)."""
    stride = float(size_divisible)
    return tuple(int(math.ceil(float(side) / stride) * stride) for side in size)


def box_scale(original: Tuple[int, int], resized: Tuple[int, int]) -> Tensor:
    """Tensor[4] float32 (rw, rh, rw, rh): what torchvision's ``resize_boxes``
    multiplies x and y by to go from resized to original pixels, each ratio computed
    as there (float32 original side / float32 resized side)."""
    ratio_h, ratio_w = (
        torch.tensor(o, dtype=torch.float32) / torch.tensor(r, dtype=torch.float32)
        for o, r in zip(original, resized)
    )
    return torch.stack((ratio_w, ratio_h, ratio_w, ratio_h))


def _features(backbone: nn.Module, images: Tensor) -> List[Tensor]:
    """The backbone's feature maps as the list the head takes (torchvision wraps a
    single tensor as one level)."""
    features = backbone(images)
    if isinstance(features, Tensor):
        return [features]
    return list(features.values())


class TorchvisionDetectorModule(nn.Module):
    """A torchvision SSD, SSDLite, RetinaNet or FCOS (eval mode) with ssd_post's
    postprocess, for images of one size: ``forward(images)`` equals
    ``model(list(images))`` of the model patched with :func:`ssd_post.patch_torchvision`,
    padded.

    Args:
        model: the torchvision detector, in eval mode. Its backbone and head are
            shared (not copied); its thresholds are read now
            (``PostprocessConfig.from_torchvision``): later changes need a new module.
        example_images (Tensor[B, 3, H, W]): float images; (H, W) is the one input
            size, and their dtype and device those of the anchors' probe.

    ``forward(images [B, 3, H, W])`` (float, in [0, 1]) returns boxes [B, K, 4] float32
    in the input images' pixels, scores [B, K] float32, labels [B, K] int64 (the
    model's label ids, background 0 for SSD is never reported), num_detections [B]
    int64 and anchor_indices [B, K] int64 (rows of :attr:`anchors`, -1 in padding rows),
    K = ``config.padded_detections(A, C)``.

    Attributes fixed at export: ``input_size`` (H, W), ``resized_size`` (h, w) after
    the transform's resize (the clip size), ``batch_image_size`` (h, w) padded to
    ``size_divisible``, ``anchors`` Tensor[A, 4] in resized pixels, ``level_sizes``
    (per-level configs; None for SSD), ``num_classes`` C, ``has_score_factor``.
    """

    def __init__(self, model: nn.Module, example_images: Tensor) -> None:
        super().__init__()
        check_torchvision_detector(model)
        self.input_size = check_example_images(example_images)
        transform = model.transform
        self.backbone = model.backbone
        self.head = model.head
        self.config = PostprocessConfig.from_torchvision(model)
        self.resize = resize_arguments(transform, self.input_size)
        dtype, device = example_images.dtype, example_images.device
        # As transform.normalize builds them: the image's dtype, then broadcast.
        for name, values in (
            ("image_mean", transform.image_mean),
            ("image_std", transform.image_std),
        ):
            channels = torch.as_tensor(values, dtype=dtype, device=device)
            self.register_buffer(name, channels[None, :, None, None], persistent=False)
        probe = torch.zeros((1, 3) + self.input_size, dtype=dtype, device=device)
        self.resized_size = tuple(self._resize(probe).shape[-2:])
        self.batch_image_size = padded_size(self.resized_size, transform.size_divisible)
        anchors, level_sizes, self.num_classes, self.has_score_factor = self._probe(
            model, torch.zeros((1, 3) + self.batch_image_size, dtype=dtype, device=device)
        )
        self.register_buffer("anchors", anchors, persistent=False)
        self.level_sizes = level_sizes if self.config.selection == "per_level" else None
        self.register_buffer(
            "image_size",
            torch.tensor([list(self.resized_size)], dtype=torch.int64, device=device),
            persistent=False,
        )
        self.register_buffer(
            "box_scale", box_scale(self.input_size, self.resized_size).to(device), persistent=False
        )

    @torch.no_grad()
    def _probe(self, model: nn.Module, batch: Tensor) -> Tuple[Tensor, List[int], int, bool]:
        """One pass on a zero batch of the padded size: the anchors (Tensor[A, 4],
        the anchor generator's for that size), anchors per feature level (as
        RetinaNet.forward and FCOS.forward split them), the number of classes and
        whether the head gives a score factor (FCOS's centerness)."""
        from torchvision.models.detection.image_list import ImageList

        features = _features(self.backbone, batch)
        head = self.head(features)
        anchors = model.anchor_generator(ImageList(batch, [self.resized_size]), features)[0]
        locations = [f.shape[-2] * f.shape[-1] for f in features]
        per_location = head["cls_logits"].shape[1] // sum(locations)
        level_sizes = [n * per_location for n in locations]
        return (
            anchors.detach().float().clone(),
            level_sizes,
            int(head["cls_logits"].shape[-1]),
            "bbox_ctrness" in head,
        )

    def _resize(self, images: Tensor) -> Tensor:
        """GeneralizedRCNNTransform.resize's interpolate, on the whole batch (the same
        per-image arithmetic)."""
        return F.interpolate(images, mode="bilinear", align_corners=False, **self.resize)

    def _check_images(self, images: Tensor) -> None:
        expected = (3,) + self.input_size
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images should be Tensor[B, 3, {self.input_size[0]}, {self.input_size[1]}] "
                f"(the size of the export), got {tuple(images.shape)}"
            )

    def head_outputs(self, images: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Images [B, 3, H, W] in [0, 1] -> locs [B, A, 4], logits [B, A, C] and
        FCOS's centerness [B, A, 1] (None for SSD and RetinaNet), levels concatenated
        in the heads' order (the order of :attr:`anchors`)."""
        self._check_images(images)
        x = self._resize((images - self.image_mean) / self.image_std)
        pad_h, pad_w = (p - r for p, r in zip(self.batch_image_size, self.resized_size))
        if pad_h or pad_w:  # batch_images: zeros below and to the right
            x = F.pad(x, (0, pad_w, 0, pad_h))
        head = self.head(_features(self.backbone, x))
        return head["bbox_regression"], head["cls_logits"], head.get("bbox_ctrness")

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        locs, logits, score_factor = self.head_outputs(images)
        detections = postprocess(
            locs,
            logits,
            self.anchors,
            # Clipping is to the resized image, not the padded batch (torchvision's
            # image_sizes).
            self.image_size.expand(images.shape[0], 2),
            self.config,
            level_sizes=self.level_sizes,
            score_factor=score_factor,
        )
        boxes, scores, labels, counts, anchor_indices = _as_tuple(detections)
        # transform.postprocess: resized pixels back to the input's (padding rows stay 0).
        return boxes * self.box_scale, scores, labels, counts, anchor_indices
