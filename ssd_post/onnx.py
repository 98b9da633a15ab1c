"""ONNX export of ssd_post's postprocess, every mode, and runners for onnxruntime
and OpenVINO.

``torch.onnx.export(..., dynamo=True)`` sees each compiled op as one node (they have
fake kernels); :func:`translation_table` lowers them to standard ONNX ops
(:mod:`ssd_post.onnx_lowering`). SSD's fused per-class op becomes

    Softmax over C (or Sigmoid), background column masked        # [B, A, C]
    box decode (dw/dh clamped at log(1000/16)) + clip             # [B, A, 4]
    TopK of min(topk_candidates, A) per (image, class)            # [B, C, k]
    NonMaxSuppression, one "batch" per (image, class)             # strict > on score and IoU
    ScatterND of the survivors into [B, C * k], TopK per image of K               # [B, K]
    GatherElements of the first TopK's indices: each detection's anchor          # [B, K]

and every other mode (per-level and per-image selection, score factors, single
labels, allow-lists, class-agnostic NMS, the linear coder, decoded boxes) its
``select_topk`` (TopK per group), the box decode, and ``batched_nms_padded`` (one
NonMaxSuppression whose classes are the labels, then TopK per image). K is
``config.padded_detections(A, C)``, the op's own padded size (A and C are fixed at
export, only the batch is dynamic). This reproduces ssd_post's selection exactly;
only each runtime's own exp, sigmoid and softmax rounding differ (a few ULPs). ONNX
NonMaxSuppression sorts box corners before the IoU; an inverted box (zero area in
ssd_post, which suppresses nothing) goes to it as a zero-area box.

Importing :mod:`ssd_post` does not import this module (it needs onnx, onnxscript).
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import PostprocessConfig
from .formats import Detections
from .exportable import (  # noqa: F401  (public here too)
    DetectorModule,
    PostprocessModule,
    batch_dynamic_shapes,
    check_detector,
    exportable_module,
    postprocess_module,
    yolo_postprocess_module,
)
from .exportable import detections_from_outputs
from .onnx_lowering import build_lowerings, check_expressible, require  # noqa: F401

__all__ = [
    "SUPPORTED_OPSETS",
    "PostprocessModule",
    "DetectorModule",
    "translation_table",
    "export",
    "export_postprocess",
    "export_yolo_postprocess",
    "export_module",
    "load_runner",
    "load_session",
    "RUNTIMES",
    "fastest_exact_tie_order",
]

# TopK with "equal values: lower index first", NonMaxSuppression, ScatterND and
# GatherND(batch_dims) are all there from opset 13; the lowering is written with
# onnxscript's opset 18 ops (Pad/ReduceSum with tensor axes), so 18 is the floor.
SUPPORTED_OPSETS = tuple(range(18, 22))
DEFAULT_OPSET = 18
RUNTIMES = ("onnxruntime", "openvino")


def fastest_exact_tie_order(runtime: str) -> str:
    """The cheapest ``tie_order`` whose graphs are exact in ``runtime``: onnxruntime's
    TopK keeps ONNX's tie order (``"runtime"``), OpenVINO's does not (``"graph"``)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime should be one of {RUNTIMES}, got {runtime!r}")
    return "runtime" if runtime == "onnxruntime" else "graph"


# ----------------------------------------------------------------------------- lowering


def _refuse_batched_nms(*args, **kwargs):
    raise NotImplementedError(
        "ssd_post::batched_nms has no exact ONNX lowering (its output length is data-dependent "
        "and it groups by arbitrary idxs): export ssd_post.postprocess, whose padded "
        "batched_nms_padded lowers, instead"
    )


def translation_table(tie_order: str = "graph") -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` lowering
    every op an exported postprocess traces to (``postprocess``, ``select_topk``,
    ``decode_boxes``, ``batched_nms_padded``, ``decode_threshold_flatten``) to
    standard ONNX ops (:mod:`ssd_post.onnx_lowering`); ``ssd_post::batched_nms``
    raises a clear error when met. ``tie_order``: see
    :func:`ssd_post.onnx_lowering.build_lowerings` (``"graph"``: exact in every
    runtime; ``"runtime"``: exact in onnxruntime, half the top-k work)."""
    from ._extension import require_extension

    require_extension()  # the table is keyed by the compiled ops
    table = {
        getattr(torch.ops.ssd_post, name).default: lowering
        for name, lowering in build_lowerings(tie_order).items()
    }
    table[torch.ops.ssd_post.batched_nms.default] = _refuse_batched_nms
    return table


# ----------------------------------------------------------------------------- modules


def _check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(f"opset should be one of {list(SUPPORTED_OPSETS)}, got {opset!r}")


DETECTION_OUTPUTS = ("boxes", "scores", "labels", "num_detections", "anchor_indices")


def export_module(
    module: nn.Module,
    args: Tuple[Tensor, ...],
    path: str,
    input_names: Optional[Sequence[str]] = None,
    output_names: Sequence[str] = DETECTION_OUTPUTS,
    opset: int = DEFAULT_OPSET,
    tie_order: str = "graph",
) -> str:
    """``torch.onnx.export`` (dynamo) of ``module`` with ssd_post's lowerings, dim 0 of
    every input a dynamic batch, into one self-contained file at ``path`` (the same
    argument order as :func:`ssd_post.aoti.export_module`).

    Args:
        module: tensors in, tensors out (ssd_post's exportable modules, or any).
        args: example inputs; every size but the batch is fixed at export.
        path: the .onnx file to write.
        input_names: the graph's input names (default: ``module.input_names`` when
            the module has them, else ``input_0``, ``input_1``...).
        output_names: the graph's output names (default: the five detection tensors).
        opset: one of :data:`SUPPORTED_OPSETS`.
        tie_order: ``"graph"`` (default): every top-k orders equal scores by lower
            index in the graph, so the detections are ssd_post's in any runtime;
            ``"runtime"``: the runtime's TopK does (ONNX's documented order), exact in
            onnxruntime but not in OpenVINO, whose TopK orders ties arbitrarily;
            about half the top-k work.
    """
    _check_opset(opset)
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    if input_names is None:
        input_names = getattr(module, "input_names", None) or [
            f"input_{i}" for i in range(len(args))
        ]
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
            custom_translation_table=translation_table(tie_order),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic,
        )
    program.save(str(path), external_data=False)
    return str(path)


def export(
    model: nn.Module,
    path: str,
    example_images: Tensor,
    opset: int = DEFAULT_OPSET,
    tie_order: str = "graph",
) -> str:
    """Exports a detector with its postprocess to one ONNX file, dynamic batch.

    Args:
        model: an :class:`ssd_post.exportable.ExportableDetector` (the repository's
            SingleStageDetector), or a torchvision SSD, SSDLite, RetinaNet or FCOS in
            eval mode (:func:`ssd_post.exportable.exportable_module`).
        path: where the .onnx file goes (weights inside the file).
        example_images (Tensor[B, 3, H, W]): float32 example input: for an
            ExportableDetector resized and normalised at its ``image_size``; for a
            torchvision detector images in [0, 1] of the one size the graph takes (the
            model's normalisation and resize are in the graph, and boxes come back in
            these images' pixels).
        opset: ONNX opset, one of :data:`SUPPORTED_OPSETS`.
        tie_order: ``"graph"`` or ``"runtime"`` (:func:`export_module`).

    Returns:
        ``path``. The graph has input ``images`` and outputs boxes [B, K, 4], scores [B, K],
        labels [B, K] int64, num_detections [B] int64 and anchor_indices [B, K] int64 (-1
        in padding rows), K = ``config.padded_detections(A, C)`` as in eager.
    """
    module = exportable_module(model, example_images)
    with torch.no_grad():  # C, for the check, from the head on one example image
        logits = module.head_outputs(example_images[:1])[1]
    check_expressible(module.config, logits.shape[-1])
    return export_module(
        module, (example_images,), path, ["images"], opset=opset, tie_order=tie_order
    )


def export_postprocess(
    anchors: Optional[Tensor],
    config: PostprocessConfig,
    path: str,
    example_locs: Tensor,
    example_logits: Tensor,
    example_image_sizes: Optional[Tensor] = None,
    opset: int = DEFAULT_OPSET,
    *,
    level_sizes: Optional[Sequence[int]] = None,
    example_score_factor: Optional[Tensor] = None,
    tie_order: str = "graph",
) -> str:
    """The postprocess alone, any config, as one ONNX file with a dynamic batch:
    anchors [A, 4] (None with ``box_coder="none"``) and ``level_sizes`` baked in; the
    inputs are ``exportable.postprocess_input_names``: locs [B, A, 4], logits
    [B, A, C], image_sizes [B, 2] int64 (when the config clips, or SSD's op),
    score_factor [B, A(, 1)] (when an example is given). The outputs are
    :data:`DETECTION_OUTPUTS`, shaped as eager :func:`ssd_post.postprocess`'s."""
    check_expressible(config, example_logits.shape[-1])
    module, args = postprocess_module(
        anchors,
        config,
        example_locs,
        example_logits,
        example_image_sizes,
        level_sizes=level_sizes,
        example_score_factor=example_score_factor,
    )
    return export_module(module, args, path, opset=opset, tie_order=tie_order)


def export_yolo_postprocess(
    path: str,
    example_prediction: Tensor,
    opset: int = DEFAULT_OPSET,
    *,
    nc: int = 0,
    tie_order: str = "graph",
    **nms,
) -> str:
    """:func:`ssd_post.non_max_suppression` as one ONNX file with a dynamic batch, to
    append to a YOLOv8 / YOLO11 network exported elsewhere: input ``prediction``
    [B, 4 + nc + nm, N] (N and the channels fixed at export), outputs
    :data:`DETECTION_OUTPUTS` (:class:`ssd_post.exportable.YoloPostprocessModule`).

    Args:
        path: the .onnx file to write.
        example_prediction (Tensor[B, 4 + nc + nm, N]): an example network output.
        opset: one of :data:`SUPPORTED_OPSETS`.
        nc: the class columns (0: every column after the box).
        nms: ``conf_thres``, ``iou_thres``, ``classes``, ``agnostic``,
            ``multi_label``, ``max_det``, ``max_nms`` as for ``non_max_suppression``.
    """
    module = yolo_postprocess_module(example_prediction, nc, **nms)
    return export_module(module, (example_prediction,), path, opset=opset, tie_order=tie_order)


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
