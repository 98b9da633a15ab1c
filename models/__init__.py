"""Single-stage detectors (SSD, RetinaNet) whose inference goes through ssd_post.

model = build_model("tiny", num_classes=5)          # trains on a CPU
model = build_model("tiny_retinanet", num_classes=5)  # per-level head (RetinaNet), CPU too
model = build_model("ssd300_vgg16", num_classes=91)  # torchvision's state_dict layout
model = build_model("retinanet_resnet50_fpn", num_classes=91, image_size=(800, 800))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from ssd_post import PostprocessConfig

from .detector import SingleStageDetector, SSDDetector
from .tiny import build_tiny, check_width
from .tiny_retinanet import build_tiny_retinanet
from .torchvision_retinanet import (
    DEFAULT_SIZE as RETINANET_DEFAULT_SIZE,
    RetinaNetDetector,
    build_retinanet_resnet50_fpn,
    check_image_size as check_retinanet_size,
)
from .torchvision_ssd import FIXED_SIZES, build_ssd300_vgg16, build_ssdlite320_mobilenet_v3_large

ARCHS = (
    "tiny",
    "tiny_retinanet",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "retinanet_resnet50_fpn",
)
# Archs whose input size is an option (the others are built for one size).
SIZED_ARCHS = ("tiny", "tiny_retinanet", "retinanet_resnet50_fpn")
# The small CPU archs: a ``width`` option, the tiny normalisation and minimum side.
TINY_ARCHS = ("tiny", "tiny_retinanet")
TINY_MEAN = (0.5, 0.5, 0.5)
TINY_STD = (0.25, 0.25, 0.25)
TINY_DEFAULT_SIZE = (128, 128)
TINY_DEFAULT_WIDTH = 32
MIN_TINY_SIDE = 64


def _postprocess_config(
    base: PostprocessConfig, overrides: Optional[Dict[str, Any]]
) -> PostprocessConfig:
    if not overrides:
        return base
    return dataclasses.replace(base, **overrides)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_model_options(arch: Any, num_classes: Any, **kwargs: Any) -> None:
    """Checks :func:`build_model`'s arguments without building anything.

    A stored ``model_config`` (a checkpoint) or a config file goes through here, so
    a bad value is refused with its name before any tensor is allocated.

    Raises:
        ValueError: naming the option, the value received and what is allowed.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {list(ARCHS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(
            f"num_classes should be an int >= 2 (background included), got {num_classes!r}"
        )
    known = {"postprocess", "image_size", "image_mean", "image_std"} | (
        {"width"} if arch in TINY_ARCHS else set()
    )
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown option(s) for arch {arch!r}: {unknown}")
    postprocess = kwargs.get("postprocess")
    if postprocess is not None:
        if not isinstance(postprocess, dict):
            raise ValueError(
                f"postprocess should be a dict of PostprocessConfig fields, got {postprocess!r}"
            )
        fields = {f.name for f in dataclasses.fields(PostprocessConfig)}
        unknown = sorted(set(postprocess) - fields)
        if unknown:
            raise ValueError(f"unknown postprocess option(s) {unknown}; known: {sorted(fields)}")
        PostprocessConfig(**postprocess)  # its own checks name a bad value
    image_size = kwargs.get("image_size")
    if image_size is not None:
        if (
            not isinstance(image_size, (list, tuple))
            or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
        ):
            raise ValueError(f"image_size should be (h, w), two ints, got {image_size!r}")
        if arch in TINY_ARCHS and min(image_size) < MIN_TINY_SIDE:
            raise ValueError(
                f"image_size should be (h, w) with both >= {MIN_TINY_SIDE}, got {image_size!r}"
            )
        if arch == "retinanet_resnet50_fpn":
            check_retinanet_size(image_size)
        if arch not in SIZED_ARCHS and tuple(image_size) != FIXED_SIZES[arch]:
            raise ValueError(
                f"{arch} has a fixed input size {FIXED_SIZES[arch]}, "
                f"got image_size {tuple(image_size)}"
            )
    for name in ("image_mean", "image_std"):
        value = kwargs.get(name)
        if value is not None and (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or not all(_is_number(v) for v in value)
        ):
            raise ValueError(f"{name} should be three numbers, got {value!r}")
    if "width" in kwargs:
        check_width(kwargs["width"])


def build_model(arch: str, num_classes: int, **kwargs: Any) -> SingleStageDetector:
    """Builds a single-stage detector (SSD or RetinaNet).

    Args:
        arch: ``"tiny"``, ``"tiny_retinanet"``, ``"ssd300_vgg16"``,
            ``"ssdlite320_mobilenet_v3_large"`` or ``"retinanet_resnet50_fpn"``.
        num_classes: logit columns, background (column 0) included (91 for COCO as
            torchvision counts it); the sigmoid RetinaNets keep column 0 as a
            column that is never a positive, as torchvision's RetinaNet does.
        **kwargs: ``postprocess`` (dict of PostprocessConfig fields to override);
            for ``tiny`` and ``tiny_retinanet`` also ``image_size`` ((h, w), default
            (128, 128)) and ``width`` (channels of the first stage, default 32); for
            ``retinanet_resnet50_fpn`` ``image_size`` (default (800, 800), sides
            multiples of 32). ``image_size``,
            ``image_mean`` and ``image_std`` as stored by ``model_config()`` are
            accepted for every arch and must equal the arch's own.

    Raises:
        ValueError: unknown arch or option, or a bad value (see :func:`check_model_options`).
    """
    check_model_options(arch, num_classes, **kwargs)
    postprocess = kwargs.get("postprocess")
    mean, std = kwargs.get("image_mean"), kwargs.get("image_std")
    extra: Dict[str, Any] = {}
    detector_class = SingleStageDetector
    if arch in TINY_ARCHS:
        width = kwargs.get("width", TINY_DEFAULT_WIDTH)
        if arch == "tiny":
            backbone, head, boxes = build_tiny(num_classes, width)
            base = PostprocessConfig(
                score_thresh=0.01, nms_thresh=0.45, topk_candidates=200, detections_per_img=100
            )
        else:
            backbone, head, base, boxes = build_tiny_retinanet(num_classes, width)
            detector_class = RetinaNetDetector  # its focal loss and per-level inputs
        size = tuple(kwargs.get("image_size") or TINY_DEFAULT_SIZE)
        arch_mean, arch_std = TINY_MEAN, TINY_STD
        extra["width"] = width
    elif arch == "retinanet_resnet50_fpn":
        backbone, head, base, arch_mean, arch_std, boxes = build_retinanet_resnet50_fpn(num_classes)
        size = tuple(kwargs.get("image_size") or RETINANET_DEFAULT_SIZE)
        detector_class = RetinaNetDetector
    else:
        builder = (
            build_ssd300_vgg16 if arch == "ssd300_vgg16" else build_ssdlite320_mobilenet_v3_large
        )
        backbone, head, base, arch_mean, arch_std, boxes, size = builder(num_classes)
    for name, given, own in (("image_mean", mean, arch_mean), ("image_std", std, arch_std)):
        if given is not None and any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(given, own)):
            raise ValueError(f"{arch} expects {name} {tuple(own)}, got {tuple(given)}")
    return detector_class(
        arch,
        num_classes,
        size,
        backbone,
        head,
        boxes,
        _postprocess_config(base, postprocess),
        arch_mean,
        arch_std,
        extra,
    )


__all__ = [
    "ARCHS",
    "RetinaNetDetector",
    "SingleStageDetector",
    "SSDDetector",  # the former name of SingleStageDetector
    "build_model",
    "check_model_options",
]
