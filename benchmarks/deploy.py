"""Deployment peers: ssd_post's postprocess exported to ONNX, run in onnxruntime and
in OpenVINO (CPU, f32), and OpenVINO's own MulticlassNms, as a deployment user would
run it instead of PyTorch.

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
from typing import Callable, Dict, List, Tuple

import torch

from ssd_post.formats import Detections

from .scenarios import Inputs, make_inputs

_CACHE: Dict[Tuple, Callable[..., Detections]] = {}
_FOLDER = tempfile.mkdtemp(prefix="ssd_post_onnx_bench_")


def available_runtimes() -> List[str]:
    """The peers (keys of PEERS) whose packages (and the export's: onnx, onnxscript) are installed."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        return []
    return [name for name, (_, package) in PEERS.items() if importlib.util.find_spec(package)]


def _key(inp: Inputs, runtime: str) -> Tuple:
    return (runtime, tuple(inp.logits.shape[1:]), inp.config, inp.anchors.data_ptr())


def _export(inp: Inputs) -> str:
    from ssd_post import onnx as ssd_onnx

    path = os.path.join(_FOLDER, f"postprocess_{len(os.listdir(_FOLDER))}.onnx")
    return ssd_onnx.export_postprocess(inp.anchors, inp.config, path, inp.locs, inp.logits, inp.image_sizes)


def prepare(inp: Inputs, runtime: str) -> Callable[..., Detections]:
    """Exports (once per geometry and config) and loads the graph in ``runtime``
    (``onnxruntime``, ``openvino`` or ``openvino_multiclass_nms``)."""
    from ssd_post import onnx as ssd_onnx

    key = _key(inp, runtime)
    if key not in _CACHE and runtime == "openvino_multiclass_nms":
        _CACHE[key] = _prepare_multiclass_nms(inp)
    if key not in _CACHE:
        threads = torch.get_num_threads()  # the same cores as the PyTorch methods
        _CACHE[key] = ssd_onnx.load_runner(_export(inp), runtime, threads=threads)
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
        from .methods import decode_clip

        boxes = decode_clip(locs, self.anchors, image_sizes, self.box_weights)
        return boxes, logits.float().softmax(-1).transpose(1, 2)


def _prepare_multiclass_nms(inp: Inputs) -> Callable[..., Detections]:
    """OpenVINO's own MulticlassNms (opset9) after a softmax + decode front: what an
    OpenVINO user would reach for. Per-class top-k (nms_top_k), strict NMS, per-image
    keep_top_k; boxes are pixels, normalized=True only means "no +1 in the areas".
    Its output is re-sorted by score per image (see :func:`_pad`) before the parity check."""
    import openvino as ov
    import openvino.opset9 as ov9

    from ssd_post import onnx as ssd_onnx

    cfg = inp.config
    path = os.path.join(_FOLDER, f"front_{len(os.listdir(_FOLDER))}.onnx")
    ssd_onnx.export_module(_DecodeSoftmax(inp), path, (inp.locs, inp.logits, inp.image_sizes),
                           ["locs", "logits", "image_sizes"], ["boxes", "scores"])
    core = ov.Core()
    front = core.read_model(path)
    # The values feeding the front's Result nodes (model.outputs are the Results themselves).
    boxes, scores = (result.input_value(0) for result in front.get_results())
    nms = ov9.multiclass_nms(boxes, scores, sort_result_type="score", sort_result_across_batch=False,
                             output_type="i64", iou_threshold=cfg.nms_thresh, score_threshold=cfg.score_thresh,
                             nms_top_k=cfg.topk_candidates, keep_top_k=cfg.detections_per_img,
                             background_class=-1 if cfg.background_class is None else cfg.background_class,
                             nms_eta=1.0, normalized=True)
    model = ov.Model([nms.output(0), nms.output(2)], front.get_parameters(), "multiclass_nms")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    k = cfg.detections_per_img

    def run(locs, logits, image_sizes) -> Detections:
        result = request.infer([locs.numpy(), logits.numpy(), image_sizes.numpy()])
        selected = torch.from_numpy(result[compiled.outputs[0]].copy())  # [M, 6] class, score, x1, y1, x2, y2
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
    out = Detections(torch.zeros(batch, k, 4), torch.zeros(batch, k), torch.zeros(batch, k, dtype=torch.int64),
                     counts.clamp(max=k))
    out.boxes[image, rank] = selected[:, 2:]
    out.scores[image, rank] = selected[:, 1]
    out.labels[image, rank] = selected[:, 0].long()
    return out


def run_openvino_multiclass_nms(inp: Inputs) -> Detections:
    return prepare(inp, "openvino_multiclass_nms")(inp.locs, inp.logits, inp.image_sizes)


# method name -> (run, runtime package)
PEERS = {"onnxruntime": (run_onnxruntime, "onnxruntime"), "openvino": (run_openvino, "openvino"),
         "openvino_multiclass_nms": (run_openvino_multiclass_nms, "openvino")}


def profile(inp: Inputs, repeats: int = 5) -> Dict[str, Dict[str, float]]:
    """Where each runtime spends the postprocess: runtime -> op type -> ms per call."""
    path = _export(inp)
    feeds = (inp.locs, inp.logits, inp.image_sizes)
    out: Dict[str, Dict[str, float]] = {}
    if "onnxruntime" in available_runtimes():
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
        node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
        for e in node_events[len(node_events) // (repeats + 1):]:  # drop the warm-up's share
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / repeats
        out["onnxruntime"] = dict(totals)
    if "openvino" in available_runtimes():
        import openvino as ov

        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True,
                                                          "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request = compiled.create_infer_request()
        arrays = [t.numpy() for t in feeds]
        totals = collections.defaultdict(float)
        for _ in range(repeats):
            request.infer(arrays)
            for info in request.profiling_info:
                totals[info.node_type] += info.real_time.total_seconds() * 1e3 / repeats
        out["openvino"] = dict(totals)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="dense")
    parser.add_argument("--model", default="ssd300")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top", type=int, default=8, help="op types shown per runtime")
    args = parser.parse_args()
    inp = make_inputs(args.scenario, args.model, args.batch, seed=args.batch)
    for runtime, ops in profile(inp).items():
        total = sum(ops.values())
        print(f"{runtime}: {total:.2f} ms per call in nodes")
        for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {name:24s} {ms:8.2f} ms  {100 * ms / max(total, 1e-9):5.1f} %")


if __name__ == "__main__":
    main()
