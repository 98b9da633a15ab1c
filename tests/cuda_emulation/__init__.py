"""The CUDA kernels of csrc/cuda, compiled for the CPU with emulator.h and called
through ctypes, so that a machine without a GPU runs the kernel code itself.

``library()`` builds ``emulated_ops.cpp`` once per source version into
``build/cuda_emulation/`` with the host C++ compiler; the functions below take
CPU tensors and return what the CUDA ops would. ``sanitized_runner()`` builds
``sanitized_run.cpp`` with AddressSanitizer and UndefinedBehaviorSanitizer.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ssd_post import PostprocessConfig

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNEL_DIR = ROOT / "csrc" / "cuda"
BUILD_DIR = ROOT / "build" / "cuda_emulation"

_FLAGS = [
    "-std=c++20",
    "-fPIC",
    "-ffp-contract=off",
    "-Wall",
    "-Wno-unknown-pragmas",
    f"-I{KERNEL_DIR}",
]
# For sanitized_run: every out-of-bounds access and undefined operation is fatal.
SANITIZER_FLAGS = [
    "-O1",
    "-g",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=undefined",
]


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _sources() -> list[Path]:
    common = ROOT / "csrc" / "common"
    return sorted(
        [
            *HERE.glob("*.h"),
            *HERE.glob("*.cpp"),
            *KERNEL_DIR.glob("*.cuh"),
            *KERNEL_DIR.glob("*.h"),
            *common.glob("*.h"),
        ]
    )


def _build(name: str, sources: list[str], flags: list[str], suffix: str = "") -> Path:
    """Compiles `sources` (in this folder) into build/cuda_emulation/, once per
    version of every file they may include (a hash in the output's name)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CUDA emulator")
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in _sources():
        digest.update(path.read_bytes())
    target = BUILD_DIR / f"{name}_{digest.hexdigest()[:16]}{suffix}"
    if not target.exists():
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        command = [cxx, *_FLAGS, *flags, *(str(HERE / s) for s in sources), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{' '.join(command)}\n{result.stderr}")
        os.replace(partial, target)  # atomic: parallel test processes never see half a file
    return target


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The emulated kernels as a shared library (built on first use, a few seconds)."""
    return ctypes.CDLL(str(_build("emulated_ops", ["emulated_ops.cpp"], ["-O2", "-shared"], ".so")))


def sanitized_runner() -> Path:
    """sanitized_run.cpp with the emulated kernels, built with ASan and UBSan: an
    executable that runs them on seeded problems and checks their outputs."""
    return _build("sanitized_run", ["emulated_ops.cpp", "sanitized_run.cpp"], SANITIZER_FLAGS)


class EmulatedInputs(ctypes.Structure):
    """The C struct of emulated_ops.h, field for field."""

    _fields_ = [
        ("locs", ctypes.c_void_p),
        ("logits", ctypes.c_void_p),
        ("anchors", ctypes.c_void_p),
        ("image_sizes", ctypes.c_void_p),
        ("B", ctypes.c_int64),
        ("A", ctypes.c_int64),
        ("C", ctypes.c_int64),
        ("background_class", ctypes.c_int64),
        ("topk_candidates", ctypes.c_int64),
        ("score_thresh", ctypes.c_double),
        ("box_weights", ctypes.c_double * 4),
        ("activation", ctypes.c_int32),
        ("per_image_anchors", ctypes.c_int32),
        ("clip", ctypes.c_int32),
    ]


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _prepare(
    locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor, config: PostprocessConfig
):
    """float32 contiguous CPU copies (as the CUDA ops' make_decode_inputs makes them)
    and the struct pointing at them; the tensors must outlive the call."""
    # Sizes truncated toward zero, as whole_image_sizes (csrc/common/op_inputs.h) does.
    image_sizes = image_sizes.trunc() if image_sizes.is_floating_point() else image_sizes
    tensors = tuple(
        t.detach().to("cpu", torch.float32).contiguous()
        for t in (locs, logits, anchors, image_sizes)
    )
    B, A, C = tensors[1].shape
    inputs = EmulatedInputs(
        *(t.data_ptr() for t in tensors),
        B,
        A,
        C,
        -1 if config.background_class is None else config.background_class,
        config.topk_candidates,
        config.score_thresh,
        (ctypes.c_double * 4)(*config.box_weights),
        0 if config.score_activation == "softmax" else 1,
        int(tensors[2].dim() == 3),
        int(bool(config.clip_boxes)),
    )
    return tensors, inputs


def _check(status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"emulated {op} failed (its reason is on stderr)")


def postprocess(
    locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor, config: PostprocessConfig
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What ``torch.ops.ssd_post.postprocess`` returns on CUDA: boxes [B, K, 4],
    scores [B, K], labels [B, K], counts [B], anchor indices [B, K] (-1 in padding),
    K = config.padded_detections(A, C)."""
    B, A, C = logits.shape
    K = config.padded_detections(A, C)
    out = (
        torch.zeros(B, K, 4),
        torch.zeros(B, K),
        torch.zeros(B, K, dtype=torch.int64),
        torch.zeros(B, dtype=torch.int64),
        torch.full((B, K), -1, dtype=torch.int64),
    )
    if B * C * min(config.topk_candidates, A) * K == 0:
        return out  # the CUDA op returns zeros (anchors -1) without a launch
    # The kernel must write every anchor slot: a value it leaves shows up as -7.
    out[4].fill_(-7)
    tensors, inputs = _prepare(locs, logits, anchors, image_sizes, config)
    status = library().emulated_postprocess(
        ctypes.byref(inputs),
        ctypes.c_double(config.nms_thresh),
        ctypes.c_int64(K),
        *(_ptr(t) for t in out),
    )
    _check(status, "postprocess")
    return out


def decode_threshold_flatten(
    locs: Tensor, logits: Tensor, anchors: Tensor, image_sizes: Tensor, config: PostprocessConfig
) -> Tuple[Tensor, Tensor, Tensor]:
    """What ``torch.ops.ssd_post.decode_threshold_flatten`` returns on CUDA:
    boxes [N, 4], scores [N], keys [N]."""
    B, A, C = logits.shape
    slots = B * C * min(config.topk_candidates, A)
    boxes, scores = torch.zeros(slots, 4), torch.zeros(slots)
    keys = torch.zeros(slots, dtype=torch.int64)
    if slots == 0:
        return boxes, scores, keys
    tensors, inputs = _prepare(locs, logits, anchors, image_sizes, config)
    count = ctypes.c_int64(-1)
    status = library().emulated_decode_threshold_flatten(
        ctypes.byref(inputs), _ptr(boxes), _ptr(scores), _ptr(keys), ctypes.byref(count)
    )
    _check(status, "decode_threshold_flatten")
    n = count.value
    return boxes[:n], scores[:n], keys[:n]


class EmulatedSelectInputs(ctypes.Structure):
    """The C struct of emulated_ops.h for select_topk, field for field."""

    _fields_ = [
        ("logits", ctypes.c_void_p),
        ("score_factor", ctypes.c_void_p),
        ("allowed", ctypes.c_void_p),
        ("level_sizes", ctypes.c_void_p),
        ("B", ctypes.c_int64),
        ("A", ctypes.c_int64),
        ("C", ctypes.c_int64),
        ("background_class", ctypes.c_int64),
        ("topk_candidates", ctypes.c_int64),
        ("score_thresh", ctypes.c_double),
        ("num_levels", ctypes.c_int32),
        ("activation", ctypes.c_int32),
        ("factor_mode", ctypes.c_int32),
        ("factor_logits", ctypes.c_int32),
        ("single_label", ctypes.c_int32),
        ("per_class", ctypes.c_int32),
    ]


# The numbers of common/score_bounds.h's Activation and FactorMode.
_ACTIVATIONS = {"softmax": 0, "sigmoid": 1, "none": 2}
_FACTOR_MODES = {"sqrt": 1, "before_threshold": 2, "after_selection": 3}


def select_topk(
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
    """What ``torch.ops.ssd_post.select_topk`` returns on CUDA, with the arguments of
    ``ssd_post.ops.select_topk_op`` (valid ones: the op checks them, this does not):
    flat and scores [B, G, k], counts [B, G] (G groups, k = ops.select_capacity)."""
    from ssd_post.ops import select_capacity

    if score_activation not in _ACTIVATIONS or factor_mode not in _FACTOR_MODES:
        raise ValueError(
            f"unknown score_activation {score_activation!r} or factor_mode {factor_mode!r}"
        )
    B, A, C = logits.shape
    sizes = torch.tensor([int(n) for n in level_sizes], dtype=torch.int64)
    groups = C if per_class else sizes.numel()
    k = select_capacity(sizes.tolist(), C, topk_candidates, single_label, per_class)
    # Poison: every slot must be written by the kernels.
    flat = torch.full((B, groups, k), -7, dtype=torch.int64)
    scores = torch.full((B, groups, k), -7.0)
    counts = torch.full((B, groups), -7, dtype=torch.int64)
    if flat.numel() == 0:
        return flat, scores, counts.zero_()
    x = logits.detach().to("cpu", torch.float32).contiguous()
    factor = (
        None
        if score_factor is None
        else score_factor.detach().to("cpu", torch.float32).reshape(B, A).contiguous()
    )
    allowed = None
    if classes is not None:  # class_allowed_mask (csrc/common/checks.h)
        allowed = torch.zeros(C, dtype=torch.uint8)
        allowed[[int(c) for c in classes]] = 1
    inputs = EmulatedSelectInputs(
        x.data_ptr(),
        None if factor is None else factor.data_ptr(),
        None if allowed is None else allowed.data_ptr(),
        sizes.data_ptr(),
        B,
        A,
        C,
        -1 if background_class is None else int(background_class),
        int(topk_candidates),
        float(score_thresh),
        sizes.numel(),
        _ACTIVATIONS[score_activation],
        0 if factor is None else _FACTOR_MODES[factor_mode],
        int(bool(factor_logits)),
        int(bool(single_label)),
        int(bool(per_class)),
    )
    status = library().emulated_select_topk(
        ctypes.byref(inputs), _ptr(flat), _ptr(scores), _ptr(counts)
    )
    _check(status, "select_topk")
    return flat, scores, counts


def nms_ranked_groups(
    ranked_boxes: Tensor,
    group_begin: Tensor,
    group_end: Tensor,
    iou_threshold: float,
    max_kept: int = -1,
) -> Tensor:
    """keep (Tensor[N] uint8) of the NMS kernel of batched_nms on ranked_boxes [N, 4],
    grouped into runs [group_begin[g], group_end[g]), each in rank order; at most
    the first max_kept survivors of each run when max_kept >= 0."""
    boxes = ranked_boxes.to(torch.float32).contiguous()
    begin = group_begin.to(torch.int64).contiguous()
    end = group_end.to(torch.int64).contiguous()
    keep = torch.full((boxes.shape[0],), 0xCD, dtype=torch.uint8)
    if begin.numel() == 0:
        return keep
    status = library().emulated_nms_ranked_groups(
        _ptr(boxes),
        _ptr(begin),
        _ptr(end),
        ctypes.c_int64(begin.numel()),
        ctypes.c_double(iou_threshold),
        ctypes.c_int64(max_kept),
        _ptr(keep),
    )
    _check(status, "nms_ranked_groups")
    return keep


def _first_per_image(ranked: Tensor, idxs: Tensor, max_kept: int, keys_per_image: int) -> Tensor:
    """first_per_image of ops_cuda.cu: ``ranked`` without each image's survivors past
    its first ``max_kept`` (image = floor(idx / keys_per_image))."""
    m = ranked.numel()
    if m == 0:
        return ranked
    images = torch.div(idxs[ranked], keys_per_image, rounding_mode="floor")
    by_image = torch.sort(images, stable=True).indices
    sorted_images = images[by_image]
    position = torch.arange(m)
    run_start = torch.zeros(m, dtype=torch.int64)
    run_start[1:] = position[1:] * (sorted_images[1:] != sorted_images[:-1])
    rank_in_image = position - torch.cummax(run_start, 0).values
    rank_by_output = torch.empty_like(rank_in_image).index_copy_(0, by_image, rank_in_image)
    return ranked[rank_by_output < max_kept]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    max_kept: Optional[int] = None,
    keys_per_image: Optional[int] = None,
) -> Tensor:
    """What ``torch.ops.ssd_post.batched_nms`` returns on CUDA: the host steps of
    batched_nms_cuda (ops_cuda.cu), one for one in torch on the CPU, around the
    emulated NMS kernel. Returns kept indices (Tensor[K] int64)."""
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    boxes, scores, idxs = boxes.float().contiguous(), scores.double(), idxs.long()
    # NaN ranks above every number and -0.0 equals 0.0, as in the CPU kernel.
    nan_mask = scores.isnan()
    is_nan = nan_mask.to(torch.uint8)
    rank_scores = scores.masked_fill(nan_mask, float("inf")).masked_fill(scores == 0, 0.0)

    def order_by_score(candidates: Tensor) -> Tensor:
        by_score = torch.sort(rank_scores[candidates], stable=True, descending=True).indices
        ordered = candidates[by_score]
        return ordered[torch.sort(is_nan[ordered], stable=True, descending=True).indices]

    by_rank = order_by_score(torch.arange(n))
    order = by_rank[torch.sort(idxs[by_rank], stable=True).indices]
    sorted_idxs = idxs[order]
    is_group_start = torch.ones(n, dtype=torch.bool)
    is_group_start[1:] = sorted_idxs[1:] != sorted_idxs[:-1]
    group_begin = is_group_start.nonzero().flatten()
    group_end = torch.cat((group_begin[1:], torch.tensor([n])))
    keep = nms_ranked_groups(
        boxes[order], group_begin, group_end, iou_threshold, -1 if max_kept is None else max_kept
    )
    if not bool(((keep == 0) | (keep == 1)).all()):
        raise RuntimeError("the emulated NMS kernel left slots of keep unwritten")
    ranked = order_by_score(torch.sort(order[keep.bool()]).values)
    if keys_per_image is not None:
        return _first_per_image(ranked, idxs, max_kept, keys_per_image)
    return ranked


def batched_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float,
    max_kept: int,
    class_agnostic: bool = False,
) -> Tuple[Tensor, Tensor]:
    """What ``torch.ops.ssd_post.batched_nms_padded`` returns on CUDA for boxes
    [B, M, 4], scores [B, M] and labels [B, M] int64: indices [B, K] int64 (-1 past
    the count) and counts [B], K = min(max_kept, M)."""
    B, M = scores.shape
    K = min(max_kept, M)
    # Poison, so that a slot the kernels leave unwritten stands out.
    indices = torch.full((B, K), -7, dtype=torch.int64)
    counts = torch.full((B,), -7, dtype=torch.int64)
    if B * M == 0:
        return indices.fill_(-1), counts.zero_()  # the CUDA op launches nothing
    # float32 contiguous, as batched_nms_padded_cuda (ops_cuda.cu) converts them.
    boxes = boxes.detach().to("cpu", torch.float32).contiguous()
    scores = scores.detach().to("cpu", torch.float32).contiguous()
    labels = labels.detach().to("cpu", torch.int64).contiguous()
    status = library().emulated_batched_nms_padded(
        _ptr(boxes),
        _ptr(scores),
        _ptr(labels),
        ctypes.c_int64(B),
        ctypes.c_int64(M),
        ctypes.c_double(iou_threshold),
        ctypes.c_int64(K),
        ctypes.c_int32(int(class_agnostic)),
        _ptr(indices),
        _ptr(counts),
    )
    _check(status, "batched_nms_padded")
    return indices, counts
