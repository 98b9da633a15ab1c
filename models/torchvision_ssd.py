"""SSD300-VGG16 and SSDLite320-MobileNetV3 with torchvision's state_dict layout.

The backbone and head are built by torchvision's own builders with no weights
(nothing is downloaded), so a checkpoint saved from torchvision's models loads
into these with ``strict=True``; postprocessing goes through ssd_post instead of
torchvision's per-image loop.
"""

from __future__ import annotations

from typing import Tuple

from torch import nn
from torchvision.models import detection

from ssd_post import DefaultBoxes, PostprocessConfig

# The input size each torchvision architecture is built for (its anchors depend on it).
FIXED_SIZES = {"ssd300_vgg16": (300, 300), "ssdlite320_mobilenet_v3_large": (320, 320)}


def _parts(model: nn.Module) -> Tuple[nn.Module, nn.Module, PostprocessConfig, tuple, tuple]:
    return (
        model.backbone,
        model.head,
        PostprocessConfig.from_torchvision(model),
        tuple(model.transform.image_mean),
        tuple(model.transform.image_std),
    )


def build_ssd300_vgg16(num_classes: int):
    """Parts of torchvision's ``ssd300_vgg16`` (input 300x300, 8732 anchors)."""
    model = detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes)
    return _parts(model) + (DefaultBoxes.ssd300(), FIXED_SIZES["ssd300_vgg16"])


def build_ssdlite320_mobilenet_v3_large(num_classes: int):
    """Parts of torchvision's ``ssdlite320_mobilenet_v3_large`` (input 320x320, 3234 anchors)."""
    model = detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes
    )
    return _parts(model) + (DefaultBoxes.ssdlite320(), FIXED_SIZES["ssdlite320_mobilenet_v3_large"])
