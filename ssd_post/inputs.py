"""The Python-side input rules of the public functions, in one place.

``postprocess``, ``decode_threshold_flatten``, the reference loops and the fake
kernels all check their tensors here, so a rule (and its error message) is written
once. The compiled ops check again in C++ (csrc/common/checks.h, op_inputs.h);
these checks run first so that bad input gets a ValueError that names the argument
instead of a RuntimeError from inside the dispatcher.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .corners import handle_inverted_boxes
from .ops import check_same_device

Anchors = Union[Tensor, Sequence[Tensor]]
ImageSizes = Union[Tensor, Sequence[Tuple[int, int]]]
LevelSizes = Union[Sequence[int], Tensor]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_float_tensor(t, name: str, rank: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} should be a Tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} should be a {rank}d tensor {layout}, got {t.dim()}D")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} should be float32, float16 or bfloat16, got {t.dtype}")


def check_image_sizes_device(image_sizes: Tensor, locs: Tensor) -> None:
    """Raises a ValueError unless ``image_sizes`` is on the CPU or on the device of
    ``locs``. CPU sizes are accepted on every device: the ops check their values on
    the host without a device synchronization (csrc/common/op_inputs.h)."""
    if image_sizes.device != locs.device and image_sizes.device.type != "cpu":
        raise ValueError(
            f"image_sizes should be on the CPU or on the same device as locs, got "
            f"{image_sizes.device} and {locs.device}"
        )


def _anchors_tensor(anchors: Anchors, locs: Tensor, batch: int) -> Tensor:
    """Anchors as one tensor ([A, 4] or [B, A, 4]) from a tensor or a list of B."""
    if isinstance(anchors, (list, tuple)):
        if len(anchors) != batch:
            raise ValueError(
                f"anchors should be a list of B = {batch} tensors [A, 4], got {len(anchors)}"
            )
        if batch == 0:
            return locs.new_zeros((locs.shape[1], 4), dtype=torch.float32)
        if not all(isinstance(a, Tensor) for a in anchors):
            raise ValueError("anchors should be a list of Tensors [A, 4]")
        shapes = {tuple(a.shape) for a in anchors}
        if len(shapes) != 1:
            raise ValueError(f"anchors should all have the same shape [A, 4], got {sorted(shapes)}")
        return torch.stack(list(anchors))
    if not isinstance(anchors, Tensor):
        raise ValueError(
            "anchors should be a Tensor [A, 4] / [B, A, 4] or a list of them, "
            f"got {type(anchors).__name__}"
        )
    return anchors


def _image_sizes_tensor(image_sizes: ImageSizes, locs: Tensor, batch: int) -> Tensor:
    """Image sizes as Tensor[B, 2] (h, w): the given tensor, or int64 on the CPU for a
    list of pairs (fractions truncated toward zero, as torchvision's ``int()``)."""
    if isinstance(image_sizes, Tensor):
        sizes = image_sizes
        check_image_sizes_device(sizes, locs)
    else:
        try:
            pairs = [tuple(int(v) for v in hw) for hw in image_sizes]
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"image_sizes should be a list of (height, width) pairs, got {image_sizes!r}"
            ) from err
        if any(len(hw) != 2 for hw in pairs):
            raise ValueError(
                f"image_sizes should be a list of (height, width) pairs, got {image_sizes!r}"
            )
        sizes = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
    if sizes.dim() != 2 or sizes.shape[0] != batch or sizes.shape[1] != 2:
        raise ValueError(
            f"image_sizes should be [B, 2] = [{batch}, 2] of (height, width), "
            f"got shape {tuple(sizes.shape)}"
        )
    return sizes


def normalize_inputs(
    locs: Tensor,
    logits: Tensor,
    anchors: Optional[Anchors],
    image_sizes: Optional[ImageSizes],
    inverted_boxes: str = "keep",
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Checks the batch and brings anchors and image sizes to tensors.

    logits must be on the device of ``locs`` (a ValueError names both devices);
    anchors and image sizes may also be on the CPU (constants: anchors are copied
    to the device of ``locs``; image sizes stay on the CPU, where the ops check
    their values without a device synchronization). Fractional sizes are truncated
    toward zero, as torchvision's ``int()`` of a size.

    Returns:
        locs (Tensor[B, A, 4]), logits (Tensor[B, A, C]), anchors (Tensor[A, 4] or
        Tensor[B, A, 4], float32, corners handled per ``inverted_boxes``, see
        :mod:`ssd_post.corners`) and image_sizes (Tensor[B, 2] (h, w): int64 on the
        CPU for a list, else the given tensor). A None anchors or image_sizes stays
        None (decoded boxes need no anchors; boxes that are not clipped no sizes).
    """
    _check_float_tensor(locs, "locs", 3, "[B, A, 4]")
    _check_float_tensor(logits, "logits", 3, "[B, A, C]")
    check_same_device("locs", {"locs": locs, "logits": logits})
    if locs.shape[2] != 4:
        raise ValueError(
            f"locs should have 4 box regressions in its last dim, got shape {list(locs.shape)}"
        )
    for dim, name in ((0, "batch size B"), (1, "number of anchors A")):
        if locs.shape[dim] != logits.shape[dim]:
            raise ValueError(
                f"locs and logits should have the same {name}, got {locs.shape[dim]} and "
                f"{logits.shape[dim]}"
            )
    batch = logits.shape[0]
    sizes = None if image_sizes is None else _image_sizes_tensor(image_sizes, locs, batch)
    if anchors is None:
        return locs, logits, None, sizes
    anchors = _anchors_tensor(anchors, locs, batch)
    if not anchors.is_floating_point():
        raise ValueError(f"anchors should be a floating point tensor, got {anchors.dtype}")
    if anchors.device.type != "cpu":  # CPU anchors are constants: copied to locs' device
        check_same_device("locs", {"locs": locs, "anchors": anchors})
    anchors = handle_inverted_boxes(
        anchors.to(device=locs.device, dtype=torch.float32), inverted_boxes, "anchors"
    )
    return locs, logits, anchors, sizes


def check_level_sizes(level_sizes: Optional[LevelSizes], num_anchors: int) -> List[int]:
    """Anchors per feature level as a list of ints summing to ``num_anchors`` (A)."""
    if level_sizes is None:
        raise ValueError(
            "level_sizes should be given (anchors per feature level) for "
            "selection='per_level', got None"
        )
    if isinstance(level_sizes, Tensor):
        if level_sizes.dim() != 1 or level_sizes.is_floating_point():
            raise ValueError(
                "level_sizes should be a 1d integer tensor, "
                f"got {level_sizes.dim()}D {level_sizes.dtype}"
            )
        level_sizes = level_sizes.tolist()
    try:
        sizes = [int(n) for n in level_sizes]
    except (TypeError, ValueError) as err:
        raise ValueError(f"level_sizes should be a list of ints, got {level_sizes!r}") from err
    if not sizes or any(n < 0 for n in sizes) or sum(sizes) != num_anchors:
        raise ValueError(
            f"level_sizes should be ints >= 0 summing to A = {num_anchors}, got {sizes}"
        )
    return sizes


def check_score_factor(
    score_factor: Optional[Tensor],
    centerness: Optional[Tensor],
    factor_mode: Optional[str],
    batch: int,
    num_anchors: int,
) -> Optional[Tensor]:
    """The per-anchor score factor as Tensor[B, A, 1], or None when the config has no
    ``score_factor_mode``. ``centerness`` is its old name (FCOS); give one of them."""
    name = "score_factor"
    if centerness is not None:
        if score_factor is not None:
            raise ValueError("give score_factor or its old name centerness, not both")
        score_factor, name = centerness, "centerness"
    if factor_mode is None:
        if score_factor is not None:
            raise ValueError(
                f"{name} is only used with a config.score_factor_mode "
                "('sqrt', 'before_threshold' or 'after_selection'), got None"
            )
        return None
    if not isinstance(score_factor, Tensor):
        raise ValueError(
            f"{name} should be a Tensor [B, A] or [B, A, 1] for score_factor_mode="
            f"{factor_mode!r}, got {type(score_factor).__name__}"
        )
    if score_factor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} should be float32, float16 or bfloat16, got {score_factor.dtype}")
    if tuple(score_factor.shape) not in ((batch, num_anchors), (batch, num_anchors, 1)):
        raise ValueError(
            f"{name} should be [B, A] or [B, A, 1] = [{batch}, {num_anchors}(, 1)], "
            f"got {tuple(score_factor.shape)}"
        )
    return score_factor.reshape(batch, num_anchors, 1)
