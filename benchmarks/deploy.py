"""Deployment peers: ssd_post's postprocess exported to ONNX, run in onnxruntime and
in OpenVINO (CPU, f32), and OpenVINO's own MulticlassNms and DetectionOutput (the Caffe
SSD op), as a deployment user would run it instead of PyTorch.

Only the postprocess is timed: the graph takes the head outputs (locs, logits,
image_sizes) with the anchors baked in. Export and session creation happen once per
(model geometry, config) in :func:`prepare`, outside the timed calls. Parity is
checked against torchvision like every other method (the lowering is exact up to
the runtime's exp/softmax rounding, within benchmarks.parity's tolerances).

    python -m benchmarks.deploy --scenario dense --model ssd300 --batch 8   # per-op profile
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import tempfile
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ssd_post.formats import Detections

from .common import decode_clip
from .scenarios import Inputs, make_inputs

_CACHE: Dict[Tuple, Callable[..., Detections]] = {}
_FOLDER = tempfile.mkdtemp(prefix="ssd_post_onnx_bench_")


def available_runtimes() -> List[str]:
    """The peers (keys of PEERS) whose packages (and the export's: onnx, onnxscript) are
    installed."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        return []
    return [name for name, (_, package) in PEERS.items() if importlib.util.find_spec(package)]


def _key(inp: Inputs, runtime: str) -> Tuple:
    return (runtime, tuple(inp.logits.shape[1:]), inp.config, inp.anchors.data_ptr())


def _export(inp: Inputs, runtime: str = "openvino") -> str:
    """The postprocess graph of ``inp``, with the cheapest tie order exact in ``runtime``."""
    from ssd_post import onnx as ssd_onnx

    path = os.path.join(_FOLDER, f"postprocess_{len(os.listdir(_FOLDER))}.onnx")
    return ssd_onnx.export_postprocess(
        inp.anchors,
        inp.config,
        path,
        inp.locs,
        inp.logits,
        inp.image_sizes,
        tie_order=ssd_onnx.fastest_exact_tie_order(runtime),
    )


def prepare(inp: Inputs, runtime: str) -> Callable[..., Detections]:
    """Exports (once per geometry and config) and loads the graph in ``runtime``
    (``onnxruntime``, ``openvino`` or ``openvino_multiclass_nms``)."""
    from ssd_post import onnx as ssd_onnx

    key = _key(inp, runtime)
    if key not in _CACHE and runtime == "openvino_multiclass_nms":
        _CACHE[key] = _prepare_multiclass_nms(inp)
    if key not in _CACHE and runtime == "openvino_detection_output":
        _CACHE[key] = _prepare_detection_output(inp)
    if key not in _CACHE:
        threads = torch.get_num_threads()  # the same cores as the PyTorch methods
        _CACHE[key] = ssd_onnx.load_runner(_export(inp, runtime), runtime, threads=threads)
    return _CACHE[key]


def run_onnxruntime(inp: Inputs) -> Detections:
    return prepare(inp, "onnxruntime")(inp.locs, inp.logits, inp.image_sizes)


def run_openvino(inp: Inputs) -> Detections:
    return prepare(inp, "openvino")(inp.locs, inp.logits, inp.image_sizes)


class _DecodeSoftmax(torch.nn.Module):
    """The front of OpenVINO's MulticlassNms peer: decoded, clipped boxes [B, A, 4] and
    per-class scores [B, C, A] (the layout MulticlassNms reads)."""

    def __init__(self, inp: Inputs) -> None:
        super().__init__()
        self.register_buffer("anchors", inp.anchors.float().clone(), persistent=False)
        self.box_weights = inp.config.box_weights

    def forward(self, locs, logits, image_sizes):
        boxes = decode_clip(locs, self.anchors, image_sizes, self.box_weights)
        return boxes, logits.float().softmax(-1).transpose(1, 2)


def _compile_openvino(model, perf_count: bool = False):
    """An OpenVINO model compiled for the CPU in f32 on torch's thread count."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if perf_count:
        config["PERF_COUNT"] = True
    return ov.Core().compile_model(model, "CPU", config)


def _multiclass_nms_model(inp: Inputs):
    """OpenVINO's own MulticlassNms (opset9) after a softmax + decode front: what an
    OpenVINO user would reach for. Per-class top-k (nms_top_k), strict NMS, per-image
    keep_top_k; boxes are pixels, normalized=True only means "no +1 in the areas".
    Inputs locs, logits, image_sizes; outputs the selected rows and the counts."""
    import openvino as ov
    import openvino.opset9 as ov9

    from ssd_post import onnx as ssd_onnx

    cfg = inp.config
    path = os.path.join(_FOLDER, f"front_{len(os.listdir(_FOLDER))}.onnx")
    ssd_onnx.export_module(
        _DecodeSoftmax(inp),
        (inp.locs, inp.logits, inp.image_sizes),
        path,
        ["locs", "logits", "image_sizes"],
        ["boxes", "scores"],
    )
    core = ov.Core()
    front = core.read_model(path)
    # The values feeding the front's Result nodes (model.outputs are the Results themselves).
    boxes, scores = (result.input_value(0) for result in front.get_results())
    nms = ov9.multiclass_nms(
        boxes,
        scores,
        sort_result_type="score",
        sort_result_across_batch=False,
        output_type="i64",
        iou_threshold=cfg.nms_thresh,
        score_threshold=cfg.score_thresh,
        nms_top_k=cfg.topk_candidates,
        keep_top_k=cfg.detections_per_img,
        background_class=-1 if cfg.background_class is None else cfg.background_class,
        nms_eta=1.0,
        normalized=True,
    )
    return ov.Model([nms.output(0), nms.output(2)], front.get_parameters(), "multiclass_nms")


def _prepare_multiclass_nms(inp: Inputs) -> Callable[..., Detections]:
    """The MulticlassNms peer; its output is re-sorted by score per image (see
    :func:`_pad`) before the parity check."""
    compiled = _compile_openvino(_multiclass_nms_model(inp))
    request = compiled.create_infer_request()
    k = inp.config.detections_per_img

    def run(locs, logits, image_sizes) -> Detections:
        result = request.infer([locs.numpy(), logits.numpy(), image_sizes.numpy()])
        selected = torch.from_numpy(
            result[compiled.outputs[0]].copy()
        )  # [M, 6] class, score, x1, y1, x2, y2
        counts = torch.from_numpy(result[compiled.outputs[1]].copy()).long()  # [B]
        return _pad(selected, counts, k)

    return run


def _pad(selected: torch.Tensor, counts: torch.Tensor, k: int) -> Detections:
    """Rows [M, 6] grouped by image (``counts`` [B] each, by decreasing score) -> Detections."""
    batch = counts.numel()
    image = torch.repeat_interleave(torch.arange(batch), counts)
    # MulticlassNms's "score" order is not strictly by score across classes (two scores
    # 5e-7 apart came out swapped): re-sort each image's rows, stable, by decreasing score.
    order = torch.sort(selected[:, 1], descending=True, stable=True).indices
    order = order[torch.sort(image[order], stable=True).indices]
    selected = selected[order]
    rank = torch.arange(selected.shape[0]) - (torch.cumsum(counts, 0) - counts)[image]
    out = Detections(
        torch.zeros(batch, k, 4),
        torch.zeros(batch, k),
        torch.zeros(batch, k, dtype=torch.int64),
        counts.clamp(max=k),
    )
    out.boxes[image, rank] = selected[:, 2:]
    out.scores[image, rank] = selected[:, 1]
    out.labels[image, rank] = selected[:, 0].long()
    return out


def _detection_output_model(inp: Inputs):
    """OpenVINO's DetectionOutput (opset8, Caffe's SSD op) after an OpenVINO Softmax:
    the op an OpenVINO SSD user is given. It decodes with the priors normalised to
    [0, 1] and variances 1 / box_weights (0.1, 0.1, 0.2, 0.2 for torchvision's SSD),
    ``normalized=True``, clips before NMS, keeps ``top_k`` per class before NMS and
    ``keep_top_k`` per image after. It takes one image size for the whole graph (the
    priors are normalised by it) and does not clamp dw, dh at log(1000 / 16) as
    torchvision does; neither matters on the benchmark's inputs. Inputs locs, logits;
    output [1, 1, B * keep_top_k, 7] rows, normalised boxes."""
    import numpy as np
    import openvino as ov
    import openvino.opset8 as ov8

    cfg = inp.config
    sizes = inp.image_sizes
    if not bool((sizes == sizes[0]).all()):
        raise ValueError("openvino_detection_output takes one image size per graph")
    batch, num_anchors, num_classes = inp.logits.shape
    h, w = (int(v) for v in sizes[0])
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    variances = torch.tensor([1.0 / float(v) for v in cfg.box_weights]).expand(num_anchors, 4)
    priors = torch.stack([(inp.anchors.float() / scale).reshape(-1), variances.reshape(-1)])
    locs = ov8.parameter([-1, num_anchors, 4], np.float32, name="locs")
    logits = ov8.parameter([-1, num_anchors, num_classes], np.float32, name="logits")
    flat_locs = ov8.reshape(locs, ov8.constant(np.array([0, -1], np.int64)), special_zero=True)
    probs = ov8.reshape(
        ov8.softmax(logits, -1), ov8.constant(np.array([0, -1], np.int64)), special_zero=True
    )
    detections = ov8.detection_output(
        flat_locs,
        probs,
        ov8.constant(priors.reshape(1, 2, -1).numpy()),
        {
            "background_label_id": -1 if cfg.background_class is None else cfg.background_class,
            "top_k": cfg.topk_candidates,
            "keep_top_k": [cfg.detections_per_img],
            "code_type": "caffe.PriorBoxParameter.CENTER_SIZE",
            "share_location": True,
            "nms_threshold": cfg.nms_thresh,
            "confidence_threshold": cfg.score_thresh,
            "clip_before_nms": True,
            "clip_after_nms": False,
            "decrease_label_id": False,
            "normalized": True,
            "variance_encoded_in_target": False,
        },
    )
    return ov.Model([detections.output(0)], [locs, logits], "detection_output")


def _prepare_detection_output(inp: Inputs) -> Callable[..., Detections]:
    """The DetectionOutput peer: its rows back to pixels, grouped by image."""
    compiled = _compile_openvino(_detection_output_model(inp))
    request = compiled.create_infer_request()
    batch = inp.logits.shape[0]
    h, w = (int(v) for v in inp.image_sizes[0])
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    k = inp.config.detections_per_img

    def run(locs, logits, image_sizes) -> Detections:
        if not bool((image_sizes == torch.tensor([h, w])).all()):
            raise ValueError(
                f"openvino_detection_output takes one image size per graph, built for {(h, w)}, "
                f"got {image_sizes.tolist()}"
            )
        rows = torch.from_numpy(
            request.infer([locs.numpy(), logits.numpy()])[compiled.outputs[0]].copy()
        )
        rows = rows.reshape(-1, 7)  # image, label, score, x1, y1, x2, y2 (normalised)
        # The valid rows end at the first image id -1; what follows is not output.
        end = (rows[:, 0] < 0).nonzero()
        rows = rows[: int(end[0]) if len(end) else rows.shape[0]]
        counts = torch.bincount(rows[:, 0].long(), minlength=batch)
        order = torch.sort(rows[:, 0], stable=True).indices
        selected = torch.cat((rows[order, 1:3], rows[order, 3:] * scale), dim=1)
        return _pad(selected, counts, k)

    return run


def run_openvino_detection_output(inp: Inputs) -> Detections:
    return prepare(inp, "openvino_detection_output")(inp.locs, inp.logits, inp.image_sizes)


def run_openvino_multiclass_nms(inp: Inputs) -> Detections:
    return prepare(inp, "openvino_multiclass_nms")(inp.locs, inp.logits, inp.image_sizes)


# method name -> (run, runtime package)
PEERS = {
    "onnxruntime": (run_onnxruntime, "onnxruntime"),
    "openvino": (run_openvino, "openvino"),
    "openvino_multiclass_nms": (run_openvino_multiclass_nms, "openvino"),
    "openvino_detection_output": (run_openvino_detection_output, "openvino"),
}


def profile_graph(
    path: str, feeds, repeats: int = 5, runtimes: Sequence[str] = ("onnxruntime", "openvino")
) -> Dict[str, Dict[str, float]]:
    """Where each of ``runtimes`` (those installed) spends the ONNX file at ``path`` on
    ``feeds`` (tensors in the graph's input order): runtime -> op type -> ms per call,
    on torch's thread count."""
    out: Dict[str, Dict[str, float]] = {}
    runtimes = [r for r in runtimes if r in available_runtimes()]
    if "onnxruntime" in runtimes:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_profiling = True
        options.intra_op_num_threads = torch.get_num_threads()
        options.profile_file_prefix = os.path.join(_FOLDER, "ort_profile")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        arrays = dict(zip(names, (t.numpy() for t in feeds)))
        session.run(None, arrays)  # warm-up, not counted below
        for _ in range(repeats):
            session.run(None, arrays)
        with open(session.end_profiling()) as f:
            events = json.load(f)
        totals: Dict[str, float] = collections.defaultdict(float)
        node_events = [
            e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        ]
        for e in node_events[len(node_events) // (repeats + 1) :]:  # drop the warm-up's share
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / repeats
        out["onnxruntime"] = dict(totals)
    if "openvino" in runtimes:
        import openvino as ov

        out["openvino"] = _profile_openvino(ov.Core().read_model(path), feeds, repeats)
    return out


def _profile_openvino(model, feeds, repeats: int) -> Dict[str, float]:
    """OpenVINO's perf counts of ``model`` (compiled as the peers are): op type -> ms per call."""
    request = _compile_openvino(model, perf_count=True).create_infer_request()
    arrays = [t.numpy() for t in feeds]
    request.infer(arrays)  # warm-up
    totals: Dict[str, float] = collections.defaultdict(float)
    for _ in range(repeats):
        request.infer(arrays)
        for info in request.profiling_info:
            totals[info.node_type] += info.real_time.total_seconds() * 1e3 / repeats
    return dict(totals)


def profile(inp: Inputs, repeats: int = 5) -> Dict[str, Dict[str, float]]:
    """Where each runtime spends the postprocess: runtime -> op type -> ms per call,
    for our graph in both runtimes (each its own tie order) and OpenVINO's own SSD ops."""
    feeds = (inp.locs, inp.logits, inp.image_sizes)
    out: Dict[str, Dict[str, float]] = {}
    for runtime in ("onnxruntime", "openvino"):
        out.update(profile_graph(_export(inp, runtime), feeds, repeats, [runtime]))
    if "openvino" in available_runtimes():
        out["openvino_multiclass_nms"] = _profile_openvino(
            _multiclass_nms_model(inp), feeds, repeats
        )
        out["openvino_detection_output"] = _profile_openvino(
            _detection_output_model(inp), feeds[:2], repeats
        )
    return out


def print_profile(ops_by_runtime: Dict[str, Dict[str, float]], top: int) -> None:
    """Each runtime's node time per call and its ``top`` op types."""
    for runtime, ops in ops_by_runtime.items():
        total = sum(ops.values())
        print(f"{runtime}: {total:.2f} ms per call in nodes")
        for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {name:24s} {ms:8.2f} ms  {100 * ms / max(total, 1e-9):5.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", default="dense")
    parser.add_argument("--model", default="ssd300")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=8, help="op types shown per runtime")
    args = parser.parse_args()
    inp = make_inputs(args.scenario, args.model, args.batch, seed=args.batch)
    print_profile(profile(inp), args.top)


if __name__ == "__main__":
    main()
