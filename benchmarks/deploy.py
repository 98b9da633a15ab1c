"""Deployment peers: ssd_post's postprocess exported to ONNX, run in onnxruntime and
in OpenVINO (CPU, f32), as a deployment user would run it instead of PyTorch.

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

RUNTIMES = ("onnxruntime", "openvino")
_CACHE: Dict[Tuple, Callable[..., Detections]] = {}
_FOLDER = tempfile.mkdtemp(prefix="ssd_post_onnx_bench_")


def available_runtimes() -> List[str]:
    """The runtimes whose packages (and the export's: onnx, onnxscript) are installed."""
    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
        return []
    return [r for r in RUNTIMES if importlib.util.find_spec(r)]


def _key(inp: Inputs, runtime: str) -> Tuple:
    return (runtime, tuple(inp.logits.shape[1:]), inp.config, inp.anchors.data_ptr())


def _export(inp: Inputs) -> str:
    from ssd_post import onnx as ssd_onnx

    path = os.path.join(_FOLDER, f"postprocess_{len(os.listdir(_FOLDER))}.onnx")
    return ssd_onnx.export_postprocess(inp.anchors, inp.config, path, inp.locs, inp.logits, inp.image_sizes)


def prepare(inp: Inputs, runtime: str) -> Callable[..., Detections]:
    """Exports (once per geometry and config) and loads the graph in ``runtime``."""
    from ssd_post import onnx as ssd_onnx

    key = _key(inp, runtime)
    if key not in _CACHE:
        threads = torch.get_num_threads()  # the same cores as the PyTorch methods
        _CACHE[key] = ssd_onnx.load_runner(_export(inp), runtime, threads=threads)
    return _CACHE[key]


def run_onnxruntime(inp: Inputs) -> Detections:
    return prepare(inp, "onnxruntime")(inp.locs, inp.logits, inp.image_sizes)


def run_openvino(inp: Inputs) -> Detections:
    return prepare(inp, "openvino")(inp.locs, inp.logits, inp.image_sizes)


# method name -> (run, runtime)
PEERS = {"onnxruntime": (run_onnxruntime, "onnxruntime"), "openvino": (run_openvino, "openvino")}


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
