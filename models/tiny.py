"""A small SSD (about a million parameters) that trains on two CPU cores.

Plain 3x3 conv + BatchNorm + ReLU stages (fast on CPU, unlike depthwise convs),
four feature maps at strides 4, 8, 16 and 32 with a light top-down path so the
fine maps that find small objects also see context, and torchvision's SSDHead.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.ssd import SSDHead

from ssd_post import DefaultBoxes

# Fractions of the input side: anchors from ~10 px to ~100 px at 128 px input,
# matching the shapes set (objects of 10 to ~70 px before the resize).
TINY_SCALES = (0.08, 0.17, 0.34, 0.58, 0.85)
TINY_ASPECT_RATIOS = ([2], [2], [2], [2])


def conv_bn(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class TinyTrunk(nn.Module):
    """Images [B, 3, H, W] -> four maps [c4, c8, c16, c32] of [B, C_k, H/s, W/s]
    for s = 4, 8, 16, 32 and C_k = ``out_channels[k]`` (w, 2w, 4w, 4w): the plain
    bottom-up stages that the tiny SSD and the tiny RetinaNet share."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            conv_bn(3, w // 2, 2), conv_bn(w // 2, w, 2), conv_bn(w, w)
        )  # stride 4
        self.stage8 = nn.Sequential(
            conv_bn(w, 2 * w, 2), conv_bn(2 * w, 2 * w), conv_bn(2 * w, 2 * w)
        )
        self.stage16 = nn.Sequential(conv_bn(2 * w, 4 * w, 2), conv_bn(4 * w, 4 * w))
        self.stage32 = nn.Sequential(conv_bn(4 * w, 4 * w, 2), conv_bn(4 * w, 4 * w))
        self.out_channels = [w, 2 * w, 4 * w, 4 * w]

    def forward(self, images: Tensor) -> List[Tensor]:
        c4 = self.stem(images)
        c8 = self.stage8(c4)
        c16 = self.stage16(c8)
        c32 = self.stage32(c16)
        return [c4, c8, c16, c32]


class TinyBackbone(TinyTrunk):
    """Images [B, 3, H, W] -> four maps [B, C_k, H/s, W/s] for s = 4, 8, 16, 32.

    The strides are about 0.4 of the anchor sizes they carry (as in SSD300), so an
    object of any size overlaps several anchors at IoU >= 0.5 and gets several
    positives, not only the one it claims; top-down connections give the fine maps,
    which find the small objects, the context of the coarser ones.
    """

    def __init__(self, width: int) -> None:
        super().__init__(width)
        w = width
        # 1x1 laterals match channels before the coarser map is added into the finer one.
        self.lateral16 = nn.Conv2d(4 * w, 2 * w, 1)
        self.smooth8 = conv_bn(2 * w, 2 * w)
        self.lateral8 = nn.Conv2d(2 * w, w, 1)
        self.smooth4 = conv_bn(w, w)

    def forward(self, images: Tensor) -> List[Tensor]:
        c4, c8, c16, c32 = super().forward(images)
        p8 = self.smooth8(
            c8 + F.interpolate(self.lateral16(c16), size=c8.shape[-2:], mode="nearest")
        )
        p4 = self.smooth4(c4 + F.interpolate(self.lateral8(p8), size=c4.shape[-2:], mode="nearest"))
        return [p4, p8, c16, c32]


def tiny_default_boxes() -> DefaultBoxes:
    return DefaultBoxes([list(r) for r in TINY_ASPECT_RATIOS], scales=list(TINY_SCALES))


def check_width(width: object) -> None:
    """ValueError unless ``width`` (channels of the first stage) is an even int >= 4."""
    if not isinstance(width, int) or isinstance(width, bool) or width < 4 or width % 2:
        raise ValueError(f"width should be an even int >= 4, got {width!r}")


def build_tiny(num_classes: int, width: int) -> Tuple[TinyBackbone, SSDHead, DefaultBoxes]:
    """Backbone, head and default boxes of the tiny SSD (``width``: channels of the
    first stage; the default is ``models.TINY_DEFAULT_WIDTH``)."""
    check_width(width)
    backbone = TinyBackbone(width)
    boxes = tiny_default_boxes()
    head = SSDHead(backbone.out_channels, boxes.num_anchors_per_location(), num_classes)
    init_background_prior(head, num_classes)
    return backbone, head, boxes


def init_background_prior(head: SSDHead, num_classes: int, foreground_prob: float = 0.01) -> None:
    """Starts every anchor at P(foreground) = ``foreground_prob``.

    Nearly all anchors are background; starting from a uniform softmax makes the
    first hundreds of steps spend themselves on pushing them down (the prior of
    RetinaNet's classification head, here on the softmax background column).
    """
    prior = math.log((1 - foreground_prob) * (num_classes - 1) / foreground_prob)
    for conv in head.classification_head.module_list:
        bias = conv.bias.detach().view(-1, num_classes)  # [anchors per location, C]
        bias.zero_()
        bias[:, 0] = prior
