"""ssd-post: batched, fused postprocessing for SSD-family detectors.

detections = ssd_post.postprocess(locs, logits, anchors, image_sizes, PostprocessConfig())
"""

from .anchors import DefaultBoxes
from .box_coder import BoxCoder
from .config import PostprocessConfig
from .formats import Detections, to_coco_results, write_coco_results
from .ops import batched_nms, has_cuda_kernels
from . import fake_kernels  # noqa: F401  (registers the ops' fake kernels)
from .linear_coder import LinearBoxCoder
from .postprocess import (
    decode_threshold_flatten,
    patch_torchvision,
    patch_torchvision_ssd,
    postprocess,
)
from .yolo import non_max_suppression

__all__ = [
    "BoxCoder",
    "DefaultBoxes",
    "Detections",
    "LinearBoxCoder",
    "PostprocessConfig",
    "batched_nms",
    "decode_threshold_flatten",
    "has_cuda_kernels",
    "non_max_suppression",
    "patch_torchvision",
    "patch_torchvision_ssd",
    "postprocess",
    "to_coco_results",
    "write_coco_results",
]
__version__ = "0.1.0"
