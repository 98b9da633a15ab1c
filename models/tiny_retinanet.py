"""A small RetinaNet that trains on two CPU cores: the tiny SSD's trunk, an FPN,
torchvision's RetinaNet head and anchors, ssd_post's per-level postprocess.

The trunk is :class:`models.tiny.TinyTrunk` (the tiny SSD's bottom-up stages); its
maps at strides 8, 16 and 32 go through torchvision's ``FeaturePyramidNetwork`` to
three maps of one channel count, which torchvision's ``RetinaNetHead`` (with
GroupNorm, as torchvision's RetinaNet v2) shares across levels. Anchors are
torchvision's ``AnchorGenerator`` with RetinaNet's three scales per octave and
three aspect ratios, at sizes and ratios fitted to the shapes set at 128x128; the
loss and the detector are :class:`models.torchvision_retinanet.RetinaNetDetector`'s.

Labels are laid out as for torchvision's RetinaNet: column k of the sigmoid logits
is label k, and column 0 (the background label of the data sets here) is never a
positive, so the focal loss trains it towards 0 on every anchor.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Dict, Tuple

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork

from ssd_post import PostprocessConfig

from .tiny import TinyTrunk, check_width
from .torchvision_retinanet import GridAnchors

ARCH = "tiny_retinanet"
# Smallest anchor of each level (strides 8, 16, 32) in input pixels; each level adds
# torchvision's 2^(1/3) and 2^(2/3) steps, so the sizes run from 12 to 76 px: the
# shapes set's objects (10 px to ~60 px after the resize to 128) at IoU >= 0.5, with
# each stride about half its anchors' size so an object overlaps several anchors.
ANCHOR_BASE_SIZES = (12, 24, 48)
# h / w of the anchors: the shapes' boxes lie between 0.72 and 1.42, which RetinaNet's
# (0.5, 1, 2) fit poorly; these give an object about 5.5 anchors at IoU >= 0.5
# instead of 4.1 (measured on 300 validation images).
ASPECT_RATIOS = (0.7, 1.0, 1.4)
# FPN and head channels per channel of the trunk's first stage.
HEAD_CHANNELS_PER_WIDTH = 2
# GroupNorm groups of the head: the channel count is 2 * width with an even width,
# so 4 always divides it.
HEAD_NORM_GROUPS = 4


class TinyFPNBackbone(nn.Module):
    """Images [B, 3, H, W] -> OrderedDict of three maps [B, F, H/s, W/s] for
    s = 8, 16, 32 (F = ``out_channels``), finest first.

    Args:
        width: channels of the trunk's first stage (:class:`models.tiny.TinyTrunk`).
        out_channels: F, the channels of every pyramid level.
    """

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.body = TinyTrunk(width)
        # The stride-4 map is left out: a head over its 32x32 cells would cost more
        # than the rest of the network, and stride 8 with 12 px anchors reaches the
        # smallest shapes.
        self.fpn = FeaturePyramidNetwork(self.body.out_channels[1:], out_channels)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        _, c8, c16, c32 = self.body(images)
        return self.fpn(OrderedDict([("p3", c8), ("p4", c16), ("p5", c32)]))


def tiny_retinanet_anchors() -> GridAnchors:
    """9 anchors per cell on each of the three levels (torchvision's scale steps)."""
    sizes = tuple(
        (base, int(base * 2 ** (1.0 / 3)), int(base * 2 ** (2.0 / 3))) for base in ANCHOR_BASE_SIZES
    )
    return GridAnchors(AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes)))


def build_tiny_retinanet(
    num_classes: int, width: int
) -> Tuple[TinyFPNBackbone, RetinaNetHead, PostprocessConfig, GridAnchors]:
    """Backbone, head, postprocess config and anchors of the tiny RetinaNet.

    Args:
        num_classes: logit columns, column 0 included (never a positive, see above).
        width: channels of the trunk's first stage; the pyramid and the head have
            ``HEAD_CHANNELS_PER_WIDTH * width``.
    """
    check_width(width)
    channels = HEAD_CHANNELS_PER_WIDTH * width
    backbone = TinyFPNBackbone(width, channels)
    anchors = tiny_retinanet_anchors()
    # GroupNorm: torchvision's head starts its convs at std 0.01, made for a
    # pretrained backbone; from scratch, four such convs without a norm shrink the
    # signal about a thousandfold before the first step.
    head = RetinaNetHead(
        channels,
        anchors.generator.num_anchors_per_location()[0],
        num_classes,
        norm_layer=partial(nn.GroupNorm, HEAD_NORM_GROUPS),
    )
    postprocess = PostprocessConfig(
        score_thresh=0.05,
        nms_thresh=0.5,
        topk_candidates=1000,
        detections_per_img=100,
        # The coder the head's loss encodes with, so training and inference agree.
        box_weights=tuple(float(w) for w in head.regression_head.box_coder.weights),
        score_activation="sigmoid",
        background_class=None,
        selection="per_level",
    )
    return backbone, head, postprocess, anchors
