"""Thin Python entry points to the compiled ops, and their fake kernels.

The kernels come from ``ssd_post._C`` (loaded by ``_extension``); every entry point
here checks first that it loaded. The fake kernels below give torch.compile /
torch.export the output shapes without running anything; they are registered only
when the ops exist.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._extension import extension_loaded, require_extension
from .config import padded_detections, unit_scalar
from .corners import handle_inverted_boxes

__all__ = [
    "decode_threshold_flatten_op",
    "batched_nms",
    "postprocess_op",
    "has_cuda_kernels",
    "check_same_device",
    "cpu_vector_kernels",
    "per_level_cpu_scoring",
]


def check_same_device(reference: str, tensors: dict) -> None:
    """Raises a ValueError naming both devices when a tensor of ``tensors`` (name ->
    Tensor) is not on the device of ``tensors[reference]``. Run before dispatch,
    and by the fake kernels: a ``meta`` tensor next to a CPU tensor would
    otherwise reach the fake kernel and pass."""
    device = tensors[reference].device
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(
                f"{name} should be on the same device as {reference}, got "
                f"{tensor.device} and {device}"
            )


def _check_image_sizes_device(image_sizes: Tensor, locs: Tensor) -> None:
    # CPU image sizes are accepted on every device (their values are checked on the
    # host without a synchronization, csrc/common/op_inputs.h).
    if image_sizes.device != locs.device and image_sizes.device.type != "cpu":
        raise ValueError(
            f"image_sizes should be on the CPU or on the same device as locs, got "
            f"{image_sizes.device} and {locs.device}"
        )


def has_cuda_kernels() -> bool:
    """Whether the extension loaded and was compiled with its CUDA kernels."""
    if not extension_loaded():
        return False
    # torch has no public query for "is a kernel registered for this dispatch key";
    # this private helper is what torch's own tests use. Calling the op on a CUDA
    # tensor instead would need a GPU, and the question is about the build.
    return torch._C._dispatch_has_kernel_for_dispatch_key("ssd_post::postprocess", "CUDA")


def cpu_vector_kernels() -> str:
    """The compilation of the CPU vector loops this process runs: ``"avx2"`` on an
    x86 CPU with AVX2 (unless ``ATEN_CPU_CAPABILITY=default``), else ``"baseline"``
    (at::vec::Vectorized at the build's baseline ISA: NEON on ARM)."""
    require_extension()
    return torch.ops.ssd_post.cpu_vector_kernels()


def per_level_cpu_scoring() -> str:
    """How the CPU ``select_per_level`` scores its (image, level) blocks in this
    process at the current thread count: ``"gathered"`` (only the pairs a logit
    bound lets through, with torch's sigmoid bits, after a self-check against
    ``torch.sigmoid``) or ``"whole_block"`` (torch.sigmoid of every block: the
    self-check failed, e.g. on a torch whose loop layout differs)."""
    require_extension()
    return torch.ops.ssd_post.per_level_cpu_scoring()


def _decode_threshold_flatten_fake(
    locs,
    logits,
    anchors,
    image_sizes,
    score_thresh,
    topk_candidates,
    box_weights,
    score_activation,
    background_class,
    clip_boxes,
):
    torch._check(locs.dim() == 3 and logits.dim() == 3, lambda: "locs and logits should be 3d")
    check_same_device("locs", {"locs": locs, "logits": logits, "anchors": anchors})
    _check_image_sizes_device(image_sizes, locs)
    n = torch.library.get_ctx().new_dynamic_size()
    return (
        locs.new_empty((n, 4), dtype=torch.float32),
        locs.new_empty((n,), dtype=torch.float32),
        locs.new_empty((n,), dtype=torch.int64),
    )


def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: "boxes should be [N, 4]")
    check_same_device("boxes", {"boxes": boxes, "scores": scores, "idxs": idxs})
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


def _postprocess_fake(
    locs,
    logits,
    anchors,
    image_sizes,
    score_thresh,
    nms_thresh,
    topk_candidates,
    detections_per_img,
    box_weights,
    score_activation,
    background_class,
    clip_boxes,
):
    torch._check(logits.dim() == 3, lambda: "logits should be [B, A, C]")
    check_same_device("locs", {"locs": locs, "logits": logits, "anchors": anchors})
    _check_image_sizes_device(image_sizes, locs)
    batch, num_anchors, num_classes = logits.shape
    foreground = num_classes - (0 if background_class is None else 1)
    k = padded_detections(detections_per_img, topk_candidates, num_anchors, foreground)
    return (
        locs.new_empty((batch, k, 4), dtype=torch.float32),
        locs.new_empty((batch, k), dtype=torch.float32),
        locs.new_empty((batch, k), dtype=torch.int64),
        locs.new_empty((batch,), dtype=torch.int64),
    )


def level_capacity(level_sizes: List[int], num_classes: int, topk_candidates: int) -> int:
    """Slots per (image, level) of ``select_per_level``: min(topk, largest A_l * C)
    (common/select_params.h ``level_capacity``, which sizes the kernels' outputs; a
    test holds the two equal)."""
    return min(topk_candidates, max(level_sizes) * num_classes)


def _select_per_level_fake(
    logits, centerness, level_sizes, score_thresh, topk_candidates, background_class
):
    torch._check(logits.dim() == 3, lambda: "logits should be [B, A, C]")
    batch, _, num_classes = logits.shape
    k = level_capacity(list(level_sizes), num_classes, topk_candidates)
    return (
        logits.new_empty((batch, len(level_sizes), k), dtype=torch.int64),
        logits.new_empty((batch, len(level_sizes), k), dtype=torch.float32),
        logits.new_empty((batch, len(level_sizes)), dtype=torch.int64),
    )


def select_per_level_op(
    logits: Tensor,
    centerness: Optional[Tensor],
    level_sizes: List[int],
    score_thresh: float,
    topk_candidates: int,
    background_class: Optional[int],
) -> Tuple[Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.select_per_level`` (CPU and CUDA; inputs checked).

    Returns:
        flat (Tensor[B, L, k] int64, anchor * C + class, -1 past the count), scores
        (Tensor[B, L, k] float32) and counts (Tensor[B, L] int64); each (image, level)
        ranked by decreasing score, equal scores by flat index; k = level_capacity().
    """
    require_extension()
    return torch.ops.ssd_post.select_per_level(
        logits,
        centerness,
        [int(n) for n in level_sizes],
        float(score_thresh),
        int(topk_candidates),
        background_class,
    )


def batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, inverted_boxes: str = "keep"
) -> Tensor:
    """Greedy NMS applied independently inside each group of equal ``idxs``.

    Same contract as ``torchvision.ops.batched_nms``, computed per group (no
    coordinate-offset trick, so any idx values and coordinates are exact).

    Args:
        boxes (Tensor[N, 4]): xyxy boxes with x1 <= x2, y1 <= y2, floating point
            (computed in float32). An inverted box has zero area and suppresses
            nothing, as in torchvision; see ``inverted_boxes``.
        scores (Tensor[N]): scores; NaN ranks above every number, as in ``torch.sort``.
        idxs (Tensor[N]): integer group of each box (e.g. image * C + class).
        iou_threshold (float): in [0, 1]; a box whose IoU with a kept box of its group
            is ``> iou_threshold`` is dropped. Zero-area boxes suppress nothing.
            Any real number that converts exactly (numpy scalar, 0-d tensor).
        inverted_boxes: ``"keep"`` (torchvision), ``"sort"`` the corners first
            (ONNX / TensorFlow NMS) or ``"raise"`` a ValueError on an inverted box.

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score, equal scores
        in increasing index order.
    """
    for name, value in (("boxes", boxes), ("scores", scores), ("idxs", idxs)):
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} should be a Tensor, got {type(value).__name__}")
    check_same_device("boxes", {"boxes": boxes, "scores": scores, "idxs": idxs})
    if boxes.is_quantized or scores.is_quantized:
        raise ValueError(
            "boxes and scores should be floating point tensors, got "
            f"{boxes.dtype} and {scores.dtype} (dequantize them first)"
        )
    boxes = handle_inverted_boxes(boxes, inverted_boxes, "boxes")
    require_extension()
    return torch.ops.ssd_post.batched_nms(
        boxes, scores, idxs, unit_scalar(iou_threshold, "iou_threshold")
    )


def decode_threshold_flatten_op(
    locs: Tensor,
    logits: Tensor,
    anchors: Tensor,
    image_sizes: Tensor,
    score_thresh: float,
    topk_candidates: int,
    box_weights: List[float],
    score_activation: str,
    background_class: Optional[int],
    clip_boxes: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.decode_threshold_flatten`` (tensors normalised)."""
    require_extension()
    return torch.ops.ssd_post.decode_threshold_flatten(
        locs,
        logits,
        anchors,
        image_sizes,
        float(score_thresh),
        int(topk_candidates),
        [float(w) for w in box_weights],
        score_activation,
        background_class,
        bool(clip_boxes),
    )


def postprocess_op(
    locs: Tensor,
    logits: Tensor,
    anchors: Tensor,
    image_sizes: Tensor,
    score_thresh: float,
    nms_thresh: float,
    topk_candidates: int,
    detections_per_img: int,
    box_weights: List[float],
    score_activation: str,
    background_class: Optional[int],
    clip_boxes: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.postprocess`` (tensors already normalised)."""
    require_extension()
    return torch.ops.ssd_post.postprocess(
        locs,
        logits,
        anchors,
        image_sizes,
        float(score_thresh),
        float(nms_thresh),
        int(topk_candidates),
        int(detections_per_img),
        [float(w) for w in box_weights],
        score_activation,
        background_class,
        bool(clip_boxes),
    )


if extension_loaded():
    torch.library.register_fake("ssd_post::decode_threshold_flatten")(
        _decode_threshold_flatten_fake
    )
    torch.library.register_fake("ssd_post::batched_nms")(_batched_nms_fake)
    torch.library.register_fake("ssd_post::postprocess")(_postprocess_fake)
    torch.library.register_fake("ssd_post::select_per_level")(_select_per_level_fake)
