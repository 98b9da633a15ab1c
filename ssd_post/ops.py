"""Thin Python entry points to the compiled ops.

The kernels come from ``ssd_post._C`` (loaded by ``_extension``); every entry point
here checks first that it loaded. Their fake kernels (for torch.compile /
torch.export) are in ``fake_kernels.py``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._extension import extension_loaded, require_extension
from .config import unit_scalar, whole_scalar
from .corners import handle_inverted_boxes

__all__ = [
    "decode_threshold_flatten_op",
    "batched_nms",
    "batched_nms_padded",
    "best_class",
    "best_class_candidates",
    "decode_boxes",
    "postprocess_op",
    "has_cuda_kernels",
    "check_same_device",
    "cpu_vector_kernels",
    "per_level_cpu_scoring",
]


def check_same_device(reference: str, tensors: Dict[str, Tensor]) -> None:
    """Raises a ValueError naming both devices when a tensor of ``tensors`` (name ->
    Tensor) is not on the device of ``tensors[reference]``. Run before dispatch,
    and by the fake kernels: a ``meta`` tensor next to a CPU tensor would
    otherwise reach the fake kernel and pass. TorchScript compiles it (typed
    dict, no Python-only constructs), so scripted callers keep the check."""
    device = tensors[reference].device
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(
                f"{name} should be on the same device as {reference}, got "
                f"{tensor.device} and {device}"
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


def select_capacity(
    level_sizes: List[int],
    num_classes: int,
    topk_candidates: int,
    single_label: bool = False,
    per_class: bool = False,
) -> int:
    """Slots per (image, group) of ``select_topk``: per_class, min(topk, A); per
    level, min(topk, pairs of the largest level), one pair per anchor with
    ``single_label`` (common/select_params.h ``select_capacity``, which sizes the
    kernels' outputs; a test holds the two equal)."""
    if per_class:
        return min(topk_candidates, sum(level_sizes))
    return min(topk_candidates, max(level_sizes) * (1 if single_label else num_classes))


def select_topk_op(
    logits: Tensor,
    score_factor: Optional[Tensor],
    level_sizes: List[int],
    score_thresh: float,
    topk_candidates: int,
    background_class: Optional[int],
    score_activation: str = "sigmoid",
    factor_mode: str = "sqrt",
    factor_logits: bool = True,
    single_label: bool = False,
    classes: Optional[List[int]] = None,
    per_class: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.select_topk`` (CPU and CUDA; inputs checked
    by the op). The oracle is ``reference.select_topk_loop``.

    Args:
        logits (Tensor[B, A, C]): class logits (or probabilities, ``"none"``).
        score_factor (Tensor[B, A] or Tensor[B, A, 1], optional): per-anchor factor.
        level_sizes: anchors per group of levels, summing to A ([A] for per_image
            and per_class).

    Returns:
        flat (Tensor[B, G, k] int64, anchor * C + class, -1 past the count), scores
        (Tensor[B, G, k] float32, the reported score) and counts (Tensor[B, G] int64);
        G = C with ``per_class`` else the number of levels; each (image, group)
        ranked by decreasing score (the class score with "after_selection"), equal
        scores by flat index; k = select_capacity().
    """
    require_extension()
    return torch.ops.ssd_post.select_topk(
        logits,
        score_factor,
        [int(n) for n in level_sizes],
        float(score_thresh),
        int(topk_candidates),
        background_class,
        score_activation,
        factor_mode,
        bool(factor_logits),
        bool(single_label),
        None if classes is None else [int(c) for c in classes],
        bool(per_class),
    )


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    inverted_boxes: str = "keep",
    max_kept: Optional[int] = None,
    keys_per_image: Optional[int] = None,
) -> Tensor:
    """Greedy NMS applied independently inside each group of equal ``idxs``.

    Same contract as ``torchvision.ops.batched_nms``, computed per group (no
    coordinate-offset trick, so any idx values and coordinates are exact). Scripts
    with ``torch.jit.script`` (docs/torchscript.md).

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
        max_kept (int, optional): stop each group after ``max_kept`` survivors, like
            ONNX's ``max_output_boxes_per_class`` or TensorFlow's ``max_output_size``:
            the result is the full NMS's result without each group's survivors past
            its first ``max_kept`` (in rank order), and the boxes ranked after them
            are not looked at. ``None``: no limit. Pass it by keyword.
        keys_per_image (int, optional): with ``max_kept``, count survivors per image
            instead of per group, for ``idxs = image * keys_per_image + class``
            (image = ``idxs // keys_per_image``, floor division): each image keeps its
            ``max_kept`` best survivors of the full NMS in the output order below,
            which it reaches by scanning its boxes in that order with one kept list
            per group. Pass it by keyword.

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score, equal scores
        in increasing index order.
    """
    # The eager-only part: type checks and conversions that TorchScript's typed
    # signature makes unnecessary (and that it could not compile).
    if not torch.jit.is_scripting():
        for name, value in (("boxes", boxes), ("scores", scores), ("idxs", idxs)):
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} should be a Tensor, got {type(value).__name__}")
        iou_threshold = unit_scalar(iou_threshold, "iou_threshold")
        if max_kept is not None:
            max_kept = whole_scalar(max_kept, "max_kept", minimum=0)
        if keys_per_image is not None:
            keys_per_image = whole_scalar(keys_per_image, "keys_per_image")
        require_extension()
    check_same_device("boxes", {"boxes": boxes, "scores": scores, "idxs": idxs})
    if boxes.is_quantized or scores.is_quantized:
        raise ValueError(
            "boxes and scores should be floating point tensors, got "
            f"{boxes.dtype} and {scores.dtype} (dequantize them first)"
        )
    boxes = handle_inverted_boxes(boxes, inverted_boxes, "boxes")
    # The op checks iou_threshold's range, max_kept and keys_per_image (ValueError).
    return torch.ops.ssd_post.batched_nms(
        boxes, scores, idxs, iou_threshold, max_kept, keys_per_image
    )


def batched_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float,
    max_kept: int,
    class_agnostic: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Greedy NMS of each image's padded candidates, with fixed-size outputs.

    Per image, independently: the non-empty slots ranked by decreasing score (NaN
    above every number, as in ``torch.sort``; equal scores by lower slot), then
    greedy NMS in that order among equal labels (any labels with
    ``class_agnostic``), stopped after ``max_kept`` survivors. The same survivors as
    :func:`batched_nms` with ``idxs = image * num_labels + label``, ``max_kept`` and
    ``keys_per_image = num_labels`` on the non-empty slots. On CUDA it never waits
    for the host, so a padded postprocess pipeline stays sync-free and exportable.
    Scripts with ``torch.jit.script``.

    Args:
        boxes (Tensor[B, M, 4]): xyxy boxes, float32, float16 or bfloat16 (computed
            in float32). Zero-area boxes suppress nothing.
        scores (Tensor[B, M]): float32, float16 or bfloat16.
        labels (Tensor[B, M] int64): the class of each slot; a negative label (-1)
            marks an empty slot, which is ignored.
        iou_threshold (float): in [0, 1]; a box whose IoU with a kept box of its
            label is ``> iou_threshold`` is dropped.
        max_kept (int): >= 1, the most survivors per image.
        class_agnostic (bool): suppress across labels.

    Returns:
        indices (Tensor[B, K] int64): the survivors' slots in rank order, -1 past the
        count, with K = min(max_kept, M); counts (Tensor[B] int64).
    """
    if not torch.jit.is_scripting():
        for name, value in (("boxes", boxes), ("scores", scores), ("labels", labels)):
            if not isinstance(value, Tensor):
                raise ValueError(f"{name} should be a Tensor, got {type(value).__name__}")
        iou_threshold = unit_scalar(iou_threshold, "iou_threshold")
        max_kept = whole_scalar(max_kept, "max_kept")
        if not isinstance(class_agnostic, bool):
            raise ValueError(f"class_agnostic should be a bool, got {class_agnostic}")
        require_extension()
    check_same_device("boxes", {"boxes": boxes, "scores": scores, "labels": labels})
    # The op checks shapes, dtypes and the scalars' ranges (ValueError).
    return torch.ops.ssd_post.batched_nms_padded(
        boxes, scores, labels, iou_threshold, max_kept, class_agnostic
    )


def best_class(scores: Tensor) -> Tuple[Tensor, Tensor]:
    """Each anchor's best class of class-major scores, in one read of them.

    YOLOv8 / YOLO11 give ``[B, 4 + nc + nm, N]``: ``prediction[:, 4:4 + nc]`` is such
    a tensor (a view; it is not copied when its anchors are contiguous).

    Args:
        scores (Tensor[B, C, N]): float32, float16 or bfloat16, C >= 1.

    Returns:
        best (Tensor[B, N] float32): the largest score of each anchor, NaN when any of
        its scores is NaN (as ``scores.max(1)``), and label (Tensor[B, N] int64): its
        class, the lower one at equal scores.
    """
    if not isinstance(scores, Tensor):
        raise ValueError(f"scores should be a Tensor, got {type(scores).__name__}")
    require_extension()
    return torch.ops.ssd_post.best_class(scores)


def best_class_candidates(
    scores: Tensor,
    score_thresh: float,
    max_candidates: int,
    classes: Optional[Sequence[int]] = None,
    boxes: Optional[Tensor] = None,
    box_format: str = "xyxy",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The anchors whose best class passes ``score_thresh`` and their boxes, in one
    read of the class-major scores (YOLO's prediction regime: one label per anchor).

    Per image: each anchor's best class (as ``best_class``: equal scores to the lower
    class, an anchor with a NaN score never passes) is a candidate when its score is
    ``> score_thresh`` and, given ``classes``, the class is one of them; of more than
    ``max_candidates`` candidates, the ``max_candidates`` best are kept (score
    descending, equal scores by lower anchor: YOLO's ``max_nms`` cap).

    Args:
        scores (Tensor[B, C, N]): float32, float16 or bfloat16 (compared in float32),
            C >= 1; ``prediction[:, 4:4 + nc]`` of YOLOv8's output is not copied.
        score_thresh (float): a number.
        max_candidates (int): >= 1.
        classes (sequence of int, optional): the class columns that may be reported.
        boxes (Tensor[B, 4, N], optional): each anchor's box in the layout of scores
            (``prediction[:, :4]``), float32, float16 or bfloat16.
        box_format (str): ``"xyxy"`` (taken as given) or ``"cxcywh"`` (converted as
            ``family.cxcywh_to_xyxy`` converts it, in the boxes' dtype).

    Returns:
        M slots per image in anchor order, M the most candidates an image keeps
        (data-dependent, at most ``min(N, max_candidates)``, so the outputs are as
        large as what passes; on CUDA, reading M is one host synchronisation):
        anchor (Tensor[B, M] int64, -1 past the count), score (Tensor[B, M] float32,
        0 past it), label (Tensor[B, M] int64, -1 past it), count (Tensor[B] int64)
        and the candidates' boxes (Tensor[B, M, 4] float32 x1, y1, x2, y2, zeros past
        the count; Tensor[B, 0, 4] without ``boxes``).
    """
    if not torch.compiler.is_compiling():
        if not isinstance(scores, Tensor):
            raise ValueError(f"scores should be a Tensor, got {type(scores).__name__}")
        if isinstance(score_thresh, bool) or not isinstance(score_thresh, (int, float)):
            raise ValueError(f"score_thresh should be a number, got {score_thresh!r}")
        max_candidates = whole_scalar(max_candidates, "max_candidates")
        if boxes is not None:
            if not isinstance(boxes, Tensor):
                raise ValueError(f"boxes should be a Tensor, got {type(boxes).__name__}")
            check_same_device("scores", {"scores": scores, "boxes": boxes})
        require_extension()
    # The op checks the shapes, dtypes, threshold, cap, classes and format (ValueError).
    return torch.ops.ssd_post.best_class_candidates(
        scores,
        float(score_thresh),
        max_candidates,
        None if classes is None else [int(c) for c in classes],
        boxes,
        box_format,
    )


def decode_boxes(rel_codes: Tensor, anchors: Tensor, weights: Sequence[float]) -> Tensor:
    """torchvision's box decode (``BoxCoder.decode_single``, in its op order) as one op:
    the bits of ``ssd_post.box_coder.BoxCoder(weights).decode`` on every device, and
    in exported programs, which call it instead of recompiling the formula.

    Args:
        rel_codes (Tensor[..., 4]): (dx, dy, dw, dh), any float dtype (float32 math).
        anchors (Tensor[..., 4]): xyxy anchors, broadcastable to ``rel_codes``.
        weights: (wx, wy, ww, wh), finite and > 0.

    Returns:
        Tensor[..., 4] float32: xyxy boxes (not clipped).
    """
    require_extension()
    return torch.ops.ssd_post.decode_boxes(rel_codes, anchors, [float(w) for w in weights])


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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Direct call of ``torch.ops.ssd_post.postprocess`` (tensors already normalised).

    Returns:
        boxes (Tensor[B, K, 4] float32), scores (Tensor[B, K] float32), labels
        (Tensor[B, K] int64), num_detections (Tensor[B] int64) and anchor_indices
        (Tensor[B, K] int64, the anchor row of each detection, -1 in padding rows).
    """
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
