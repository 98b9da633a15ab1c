"""SSD models whose inference goes through ssd_post.

    model = build_model("tiny", num_classes=5)          # trains on a CPU
    model = build_model("ssd300_vgg16", num_classes=91)  # torchvision's state_dict layout
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

from ssd_post import PostprocessConfig

from .detector import SSDDetector
from .tiny import build_tiny
from .torchvision_ssd import build_ssd300_vgg16, build_ssdlite320_mobilenet_v3_large

ARCHS = ("tiny", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large")
TINY_MEAN = (0.5, 0.5, 0.5)
TINY_STD = (0.25, 0.25, 0.25)


def _postprocess_config(base: PostprocessConfig, overrides: Optional[Dict[str, Any]]) -> PostprocessConfig:
    if not overrides:
        return base
    known = {f.name for f in dataclasses.fields(PostprocessConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown postprocess option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(base, **overrides)


def build_model(arch: str, num_classes: int, **kwargs: Any) -> SSDDetector:
    """Builds an SSD detector.

    Args:
        arch: ``"tiny"``, ``"ssd300_vgg16"`` or ``"ssdlite320_mobilenet_v3_large"``.
        num_classes: logit columns, background (column 0) included (91 for COCO as
            torchvision counts it).
        **kwargs: ``postprocess`` (dict of PostprocessConfig fields to override);
            for ``tiny`` also ``image_size`` ((h, w), default (128, 128)) and
            ``width`` (channels of the first stage, default 32). ``image_size``,
            ``image_mean`` and ``image_std`` as stored by ``model_config()`` are
            accepted for every arch and must equal the arch's own.

    Raises:
        ValueError: unknown arch or option, or a bad value.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {list(ARCHS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes should be an int >= 2 (background included), got {num_classes!r}")
    kwargs = dict(kwargs)
    postprocess = kwargs.pop("postprocess", None)
    image_size = kwargs.pop("image_size", None)
    mean, std = kwargs.pop("image_mean", None), kwargs.pop("image_std", None)
    extra: Dict[str, Any] = {}
    if arch == "tiny":
        width = int(kwargs.pop("width", 32))
        backbone, head, boxes = build_tiny(num_classes, width)
        size = tuple(image_size or (128, 128))
        if len(size) != 2 or min(size) < 64:
            raise ValueError(f"image_size should be (h, w) with both >= 64, got {image_size!r}")
        arch_mean, arch_std = TINY_MEAN, TINY_STD
        base = PostprocessConfig(score_thresh=0.01, nms_thresh=0.45, topk_candidates=200, detections_per_img=100)
        extra["width"] = width
    else:
        builder = build_ssd300_vgg16 if arch == "ssd300_vgg16" else build_ssdlite320_mobilenet_v3_large
        backbone, head, base, arch_mean, arch_std, boxes, size = builder(num_classes)
        if image_size is not None and tuple(image_size) != tuple(size):
            raise ValueError(f"{arch} has a fixed input size {tuple(size)}, got image_size {tuple(image_size)}")
    for name, given, own in (("image_mean", mean, arch_mean), ("image_std", std, arch_std)):
        if given is not None and any(abs(float(a) - float(b)) > 1e-6 for a, b in zip(given, own)):
            raise ValueError(f"{arch} expects {name} {tuple(own)}, got {tuple(given)}")
    if kwargs:
        raise ValueError(f"unknown option(s) for arch {arch!r}: {sorted(kwargs)}")
    return SSDDetector(arch, num_classes, size, backbone, head, boxes,
                       _postprocess_config(base, postprocess), arch_mean, arch_std, extra)


__all__ = ["ARCHS", "SSDDetector", "build_model"]
