"""ONNX export of ssd_post's postprocess, and runners for onnxruntime and OpenVINO.

``torch.onnx.export(..., dynamo=True)`` sees ``ssd_post::postprocess`` as one node (it
has a fake kernel); :func:`translation_table` lowers it to standard ONNX ops:

    Softmax over C (or Sigmoid), background column masked        # [B, A, C]
    box decode (dw/dh clamped at log(1000/16)) + clip             # [B, A, 4]
    TopK of min(topk_candidates, A) per (image, class)            # [B, C, k]
    NonMaxSuppression, one "batch" per (image, class)             # strict > on score and IoU
    ScatterND of the survivors' scores into [B, C * k], TopK per image of K    # [B, K]
    GatherElements of the first TopK's indices: each detection's anchor       # [B, K]

with K = ``config.padded_detections(A, C)``, the op's own padded size (A and C are
fixed at export, only the batch is dynamic). This reproduces torchvision's selection
exactly; only each runtime's own exp and softmax rounding differ (a few ULPs). ONNX
NonMaxSuppression sorts box corners before the IoU; decoded SSD boxes already have
x1 <= x2, y1 <= y2, so this changes nothing (a clipped box can only become zero-area,
which suppresses nothing either way).

Importing :mod:`ssd_post` does not import this module (it needs onnx, onnxscript).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .box_coder import BOX_SCALE_CLAMP
from .config import PostprocessConfig
from .formats import Detections
from .exportable import (  # noqa: F401  (public here too)
    DetectorModule,
    PostprocessModule,
    batch_dynamic_shapes,
    check_detector,
    check_onnx_config,
)
from .exportable import detections_from_outputs

__all__ = [
    "SUPPORTED_OPSETS",
    "PostprocessModule",
    "DetectorModule",
    "translation_table",
    "export",
    "export_postprocess",
    "export_module",
    "load_runner",
    "load_session",
    "RUNTIMES",
]

# TopK with "equal values: lower index first", NonMaxSuppression, ScatterND and
# GatherND(batch_dims) are all there from opset 13; the lowering is written with
# onnxscript's opset 18 ops (Pad/ReduceSum with tensor axes), so 18 is the floor.
SUPPORTED_OPSETS = tuple(range(18, 22))
DEFAULT_OPSET = 18
RUNTIMES = ("onnxruntime", "openvino")
_EXTRA = "pip install ssd-post[export]"


def require(module: str, purpose: str):
    """Imports ``module`` or raises ImportError naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the {module!r} package: {_EXTRA} (or pip install {module})"
        ) from err


# ----------------------------------------------------------------------------- lowering


def check_expressible(config: PostprocessConfig, num_classes: int) -> None:
    """Raises ValueError when the ONNX lowering cannot express ``config`` for logits
    with ``num_classes`` columns (``background_class`` may be a name: it is resolved)."""
    check_onnx_config(config)
    if config.score_activation not in ("softmax", "sigmoid"):
        raise ValueError(
            f"the ONNX lowering covers SSD's softmax and sigmoid activations, "
            f"got score_activation={config.score_activation!r}"
        )
    background = config.resolve_background_class(num_classes)
    if background is not None and background >= num_classes:
        raise ValueError(f"background_class should be < C = {num_classes}, got {background}")


def _static_dim(value, axis: int, what: str) -> int:
    """Size ``axis`` of an exporter value, which must be fixed at export: the padded K
    of the op depends on A and C, and an ONNX graph has one K for every run."""
    size = value.shape[axis] if value.shape is not None else None
    if not isinstance(size, int):
        raise ValueError(
            f"the ONNX lowering needs {what} fixed at export (only the batch is dynamic), "
            f"got {size!r}"
        )
    return size


def _lowering():
    """The onnxscript functions; built on first use so onnxscript is imported lazily."""
    onnxscript = require("onnxscript", "ONNX export")
    op = onnxscript.opset18
    FLOAT, INT64 = onnxscript.FLOAT.dtype, onnxscript.INT64.dtype

    def ints(*values: int):
        return op.Constant(value_ints=[int(v) for v in values])

    def floats(*values: float):
        return op.Constant(value_floats=[float(v) for v in values])

    def dim(x, axis: int):
        return op.Shape(x, start=axis, end=axis + 1)  # [1] int64

    def decode(locs, anchors, box_weights):
        """Boxes [B, A, 4] in the op order of ssd_post.BoxCoder.decode (same float32 bits
        except exp). x and y go together as [..., 2] pairs: half the nodes."""
        wx, wy, ww, wh = box_weights
        low, high = (
            op.Slice(anchors, ints(0), ints(2), ints(-1)),
            op.Slice(anchors, ints(2), ints(4), ints(-1)),
        )
        sizes = op.Sub(high, low)  # (widths, heights)
        half = floats(0.5)
        centers = op.Add(low, op.Mul(half, sizes))
        d_center = op.Div(op.Slice(locs, ints(0), ints(2), ints(-1)), floats(wx, wy))
        d_size = op.Min(
            op.Div(op.Slice(locs, ints(2), ints(4), ints(-1)), floats(ww, wh)),
            floats(BOX_SCALE_CLAMP),
        )
        pred_center = op.Add(op.Mul(d_center, sizes), centers)
        half_size = op.Mul(half, op.Mul(op.Exp(d_size), sizes))
        return op.Concat(op.Sub(pred_center, half_size), op.Add(pred_center, half_size), axis=-1)

    def clip(boxes, image_sizes):
        hw = op.Cast(image_sizes, to=FLOAT)  # [B, 2] (h, w)
        limit = op.Unsqueeze(op.Gather(hw, ints(1, 0, 1, 0), axis=1), ints(1))  # [B, 1, 4]
        return op.Min(op.Max(boxes, floats(0.0)), limit)

    def candidates(locs, logits, anchors, image_sizes, config: PostprocessConfig, background):
        """Per (image, class) top-k of the scores and their boxes; ``background`` is the
        resolved background column (an int) or None.

        Returns values [B, C, k] (background and sub-threshold entries are <= score_thresh),
        their anchor indices [B, C, k], their boxes [B, C * k, 4], and k, C, B as [1]
        int64 tensors.
        """
        logits = op.Cast(logits, to=FLOAT)
        scores = (
            op.Softmax(logits, axis=-1)
            if config.score_activation == "softmax"
            else op.Sigmoid(logits)
        )
        boxes = decode(op.Cast(locs, to=FLOAT), op.Cast(anchors, to=FLOAT), config.box_weights)
        if config.clip_boxes:
            boxes = clip(boxes, image_sizes)
        scores = op.Transpose(scores, perm=[0, 2, 1])  # [B, C, A]
        batch, num_classes, num_anchors = dim(scores, 0), dim(scores, 1), dim(scores, 2)
        if background is not None:
            # 0 is never > score_thresh >= 0: the background column yields no candidate.
            columns = op.Range(
                op.Constant(value_int=0), op.Squeeze(num_classes), op.Constant(value_int=1)
            )
            is_background = op.Equal(columns, op.Constant(value_int=background))
            scores = op.Where(op.Unsqueeze(is_background, ints(0, 2)), floats(0.0), scores)
        k = op.Min(num_anchors, ints(config.topk_candidates))
        # TopK keeps equal values in index order: ties go by anchor index, as in ssd_post.
        values, indices = op.TopK(scores, k, axis=-1, largest=1, sorted=1)  # [B, C, k]
        flat = op.Reshape(indices, op.Concat(batch, ints(-1, 1), axis=0))  # [B, C*k, 1]
        cand_boxes = op.GatherND(boxes, flat, batch_dims=1)  # [B, C*k, 4]
        return values, indices, cand_boxes, k, num_classes, batch

    def lower_postprocess(
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
        config = PostprocessConfig(
            score_thresh,
            nms_thresh,
            topk_candidates,
            detections_per_img,
            tuple(box_weights),
            score_activation,
            background_class,
            clip_boxes,
        )
        classes = _static_dim(logits, 2, "the number of classes C")
        check_expressible(config, classes)
        # The op's (and its fake kernel's) padded size: the graph declares exactly it.
        anchor_count = _static_dim(logits, 1, "the number of anchors A")
        padded = config.padded_detections(anchor_count, classes)
        values, indices, cand_boxes, k, num_classes, batch = candidates(
            locs, logits, anchors, image_sizes, config, config.resolve_background_class(classes)
        )
        # One NMS "batch" per (image, class): ONNX NMS shares boxes across classes,
        # but each class has its own top-k boxes here.
        nms_boxes = op.Reshape(cand_boxes, op.Concat(ints(-1), k, ints(4), axis=0))  # [B*C, k, 4]
        nms_scores = op.Reshape(values, op.Concat(ints(-1, 1), k, axis=0))  # [B*C, 1, k]
        per_class = min(config.topk_candidates, config.detections_per_img)
        selected = op.NonMaxSuppression(
            nms_boxes,
            nms_scores,
            ints(per_class),
            floats(config.nms_thresh),
            floats(config.score_thresh),
            center_point_box=0,
        )  # [M, 3]
        where = op.Gather(selected, ints(0, 2), axis=1)  # [M, 2] (image*C + class, rank)
        flat_values = op.Reshape(values, op.Concat(ints(-1), k, axis=0))  # [B*C, k]
        # Survivors keep their score, everything else -1 (below every kept score >= 0).
        kept = op.ScatterND(
            op.ConstantOfShape(op.Shape(flat_values), value=_float_tensor(-1.0)),
            where,
            op.GatherND(flat_values, where),
        )
        # The width C * k written out (not -1), so that ONNX shape inference knows it and
        # infers the TopK below as [B, K]: the graph's shape contract is checkable offline.
        width = classes * min(config.topk_candidates, anchor_count)
        per_image = op.Reshape(kept, op.Concat(batch, ints(width), axis=0))  # [B, C*k]
        # K <= C_fg * min(topk_candidates, A) <= C * k columns: a TopK of K needs no padding.
        # Ties by index = (class, rank in class), ssd_post's order.
        det_scores, det_index = op.TopK(
            per_image, ints(padded), axis=-1, largest=1, sorted=1
        )  # [B, K]
        valid = op.Greater(det_scores, floats(-0.5))
        det_boxes = op.GatherND(
            cand_boxes, op.Unsqueeze(det_index, ints(-1)), batch_dims=1
        )  # [B, K, 4]
        labels = op.Div(det_index, k)
        # The anchor of each detection: the first TopK's index at (class, rank).
        anchor_indices = op.GatherElements(
            op.Reshape(indices, op.Concat(batch, ints(width), axis=0)), det_index, axis=1
        )  # [B, K]
        det_boxes = op.Where(op.Unsqueeze(valid, ints(-1)), det_boxes, floats(0.0))
        det_scores = op.Where(valid, det_scores, floats(0.0))
        labels = op.Where(valid, labels, op.Constant(value_int=0))
        anchor_indices = op.Where(valid, anchor_indices, op.Constant(value_int=-1))
        counts = op.ReduceSum(op.Cast(valid, to=INT64), ints(1), keepdims=0)
        return det_boxes, det_scores, labels, counts, anchor_indices

    def lower_decode_threshold_flatten(
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
        config = PostprocessConfig(
            score_thresh,
            0.5,
            topk_candidates,
            1,
            tuple(box_weights),
            score_activation,
            background_class,
            clip_boxes,
        )
        classes = _static_dim(logits, 2, "the number of classes C")
        check_expressible(config, classes)
        values, _, cand_boxes, k, num_classes, batch = candidates(
            locs, logits, anchors, image_sizes, config, config.resolve_background_class(classes)
        )
        # NonZero walks [B, C, k] in row-major order: keys increasing, each by rank.
        where = op.Transpose(
            op.NonZero(op.Greater(values, floats(config.score_thresh))), perm=[1, 0]
        )  # [N, 3]
        image, label = (op.Gather(where, ints(i), axis=1) for i in range(2))  # [N, 1] each
        boxes = op.GatherND(
            op.Reshape(cand_boxes, op.Concat(batch, num_classes, k, ints(4), axis=0)), where
        )
        scores = op.GatherND(values, where)
        keys = op.Squeeze(op.Add(op.Mul(image, num_classes), label), ints(1))
        return boxes, scores, keys

    return lower_postprocess, lower_decode_threshold_flatten


def _float_tensor(value: float):
    onnx = require("onnx", "ONNX export")
    return onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [value])


def _refuse_batched_nms(*args, **kwargs):
    raise NotImplementedError(
        "ssd_post::batched_nms has no exact ONNX lowering (ONNX NonMaxSuppression groups by a "
        "class axis, not by arbitrary idxs): export ssd_post.postprocess instead"
    )


def translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` lowering
    ``ssd_post::postprocess`` and ``ssd_post::decode_threshold_flatten`` to standard
    ONNX ops; ``ssd_post::batched_nms`` raises a clear error when met."""
    from ._extension import require_extension

    require_extension()  # the table is keyed by the compiled ops

    lower_postprocess, lower_dtf = _lowering()
    return {
        torch.ops.ssd_post.postprocess.default: lower_postprocess,
        torch.ops.ssd_post.decode_threshold_flatten.default: lower_dtf,
        torch.ops.ssd_post.batched_nms.default: _refuse_batched_nms,
    }


# ----------------------------------------------------------------------------- modules


def _check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset should be one of {list(SUPPORTED_OPSETS)}, got {opset!r}")


DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections", "anchor_indices")


def export_module(
    module: nn.Module,
    path: str,
    args: Tuple[Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str] = DETECTION_OUTPUTS,
    opset: int = DEFAULT_OPSET,
) -> str:
    """``torch.onnx.export`` (dynamo) of ``module`` with ssd_post's lowerings, dim 0 of
    every input a dynamic batch, into one self-contained file at ``path``."""
    _check_opset(opset)
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    batch = torch.export.Dim("batch", min=1)
    dynamic = batch_dynamic_shapes(module, args, batch)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Every input shares the one batch Dim; torch warns that the name is used once.
        warnings.filterwarnings("ignore", message=r".*axis name: batch will not be used.*")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            custom_translation_table=translation_table(),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic,
        )
    program.save(str(path), external_data=False)
    return str(path)


def export(model: nn.Module, path: str, example_images: Tensor, opset: int = DEFAULT_OPSET) -> str:
    """Exports a SingleStageDetector with its postprocess to one ONNX file, dynamic batch.

    Args:
        model: a SingleStageDetector whose postprocess is :func:`ssd_post.postprocess`.
        path: where the .onnx file goes (weights inside the file).
        example_images (Tensor[B, 3, H, W]): float32 example input at the model's size.
        opset: ONNX opset, one of :data:`SUPPORTED_OPSETS`.

    Returns:
        ``path``. The graph has input ``images`` and outputs boxes [B, K, 4], scores [B, K],
        labels [B, K] int64, num_detections [B] int64 and anchor_indices [B, K] int64 (-1
        in padding rows), K = ``model.postprocess_config.padded_detections(A, C)`` as in
        eager.
    """
    module = DetectorModule(model)
    check_expressible(model.postprocess_config, model.num_classes)
    return export_module(module, path, (example_images,), ["images"], opset=opset)


def export_postprocess(
    anchors: Tensor,
    config: PostprocessConfig,
    path: str,
    example_locs: Tensor,
    example_logits: Tensor,
    example_image_sizes: Tensor,
    opset: int = DEFAULT_OPSET,
) -> str:
    """Exports the postprocess alone (inputs locs, logits, image_sizes; anchors baked in)."""
    check_expressible(config, example_logits.shape[-1])
    return export_module(
        PostprocessModule(anchors, config),
        path,
        (example_locs, example_logits, example_image_sizes),
        ["locs", "logits", "image_sizes"],
        opset=opset,
    )


# ----------------------------------------------------------------------------- runtimes


def load_session(
    path: str, runtime: str, threads: Optional[int] = None
) -> Callable[..., List[Tensor]]:
    """A callable running an .onnx file in ``runtime``: tensors in (graph input order),
    the graph's outputs out as CPU tensors.

    Args:
        path: an .onnx file.
        runtime: ``"onnxruntime"`` (CPU execution provider) or ``"openvino"`` (CPU, f32
            inference precision: OpenVINO would otherwise pick bf16 on CPUs that have it).
        threads: intra-op threads (None: the runtime's default).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime should be one of {RUNTIMES}, got {runtime!r}")
    arrays = lambda inputs: [t.detach().cpu().contiguous().numpy() for t in inputs]  # noqa: E731
    if runtime == "onnxruntime":
        ort = require("onnxruntime", "the onnxruntime backend")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_ort(*inputs: Tensor) -> List[Tensor]:
            return [
                torch.from_numpy(o) for o in session.run(None, dict(zip(names, arrays(inputs))))
            ]

        return run_ort
    ov = require("openvino", "the openvino backend")
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run_ov(*inputs: Tensor) -> List[Tensor]:
        result = request.infer(arrays(inputs))
        # OpenVINO may return int32 for int64 outputs; copy: its buffers are reused.
        return [torch.from_numpy(result[o].copy()) for o in compiled.outputs]

    return run_ov


def load_runner(
    path: str, runtime: str, threads: Optional[int] = None
) -> Callable[..., Detections]:
    """:func:`load_session` for a file written by :func:`export` or
    :func:`export_postprocess`: Detections out (boxes [B, K, 4], scores [B, K],
    labels [B, K] int64, num_detections [B] int64, anchor_indices [B, K] int64; None
    from a file exported before graphs had that fifth output)."""
    session = load_session(path, runtime, threads)

    def run(*inputs: Tensor) -> Detections:
        return detections_from_outputs(session(*inputs))

    return run
