"""Every postprocess mode exports to ONNX: per-level and per-image selection, the
three score-factor modes, single labels, allow-lists, class-agnostic NMS, the box,
linear and "none" coders (xyxy and cxcywh), and YOLO's [B, 4 + nc + nm, N] layout.

Fast: the graph's shape contract by ONNX shape inference alone (K, dtypes, a
dynamic batch), and onnxruntime against eager ``ssd_post.postprocess`` at batch
sizes other than the export's. Slow: OpenVINO, exact ties, and YOLO's two regimes
at 8400 anchors in both runtimes against ``ssd_post.non_max_suppression``.

Equal up to each runtime's exp / sigmoid / softmax rounding: counts and labels
equal, scores to rtol 1e-6, boxes to 1e-3 px, exact score ties compared as sets
(benchmarks.parity).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import ssd_post  # noqa: E402
from benchmarks.parity import compare  # noqa: E402
from ssd_post import onnx as ssd_onnx  # noqa: E402
from ssd_post.exportable import detections_from_outputs  # noqa: E402

from common_utils import onnx_inferred_shapes, onnx_value_dims  # noqa: E402
from export_modes import (  # noqa: E402
    CLASSES,
    LEVELS,
    MODES,
    eager_detections,
    mode_anchors,
    mode_inputs,
    mode_module,
    module_args,
)

RUNTIME_PARAMS = [pytest.param("onnxruntime", id="ort"), pytest.param("openvino", id="ov")]


def _export(name: str, path, tie_order: str = "graph") -> str:
    config, with_anchors, levels, _ = MODES[name]
    example = mode_inputs(name, 2, 0)
    return ssd_onnx.export_postprocess(
        mode_anchors() if with_anchors else None,
        config,
        str(path),
        example["locs"],
        example["logits"],
        example["image_sizes"] if config.clip_boxes else None,
        level_sizes=levels,
        example_score_factor=example.get("score_factor"),
        tie_order=tie_order,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(name, tie_order) -> the .onnx file of that mode, exported once (at B = 2)."""
    folder, paths = tmp_path_factory.mktemp("onnx_family"), {}

    def get(name: str, tie_order: str = "graph") -> str:
        if (name, tie_order) not in paths:
            path = folder / f"{name}_{tie_order}.onnx"
            paths[name, tie_order] = _export(name, path, tie_order)
        return paths[name, tie_order]

    return get


@pytest.mark.parametrize("name", list(MODES))
def test_graph_shape_contract(exported, name):
    """The declared outputs are eager's [batch, K, ...] and dtypes; ONNX shape
    inference of the graph, with those declarations erased, computes the same K and
    dtypes itself and leaves the batch dynamic. No runtime runs."""
    onnx = pytest.importorskip("onnx")
    config = MODES[name][0]
    padded = config.padded_detections(sum(LEVELS), CLASSES)
    path = exported(name)
    assert [i.name for i in onnx.load(path).graph.input] == mode_module(name).input_names
    declared, outputs, input_dims = onnx_inferred_shapes(path)
    batch = input_dims[0]
    assert isinstance(batch, str) and batch  # a named, dynamic batch
    want = {
        "boxes": ([batch, padded, 4], torch.float32),
        "scores": ([batch, padded], torch.float32),
        "labels": ([batch, padded], torch.int64),
        "num_detections": ([batch], torch.int64),
        "anchor_indices": ([batch, padded], torch.int64),
    }
    assert [o.name for o in outputs] == list(want)
    for output in outputs:
        shape, dtype = want[output.name]
        assert declared[output.name] == shape, output.name
        inferred_shape = onnx_value_dims(output)
        # The inferred batch is symbolic (a NonMaxSuppression output in between may
        # leave it unnamed); every other size is the op's, fixed.
        assert isinstance(inferred_shape[0], str), output.name
        assert inferred_shape[1:] == shape[1:], output.name
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type)
        assert np_dtype == torch.empty(0, dtype=dtype).numpy().dtype, output.name


def _assert_matches_eager(path: str, runtime: str, name: str, batch: int, seed: int) -> None:
    pytest.importorskip(runtime)
    run = ssd_onnx.load_runner(path, runtime)
    inputs = mode_inputs(name, batch, seed)
    got = run(*module_args(mode_module(name), inputs))
    want = eager_detections(name, inputs)
    for field in ("boxes", "scores", "labels", "num_detections", "anchor_indices"):
        g, w = getattr(got, field), getattr(want, field)
        assert (g.shape, g.dtype) == (w.shape, w.dtype), field
    result = compare(got, want)
    assert result.ok, f"{name} B={batch}: {result.message}"
    assert result.detections > 0  # the comparison saw detections
    # anchor_indices: the rows eager's detections came from (ties may swap rows).
    assert got.anchor_indices is not None
    torch.testing.assert_close(
        (got.anchor_indices >= 0).sum(1), (want.anchor_indices >= 0).sum(1), rtol=0, atol=0
    )


@pytest.mark.parametrize("name", list(MODES))
def test_onnxruntime_matches_eager(exported, name):
    for batch in (1, 3):  # exported at B = 2
        _assert_matches_eager(exported(name), "onnxruntime", name, batch, seed=batch)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODES))
def test_openvino_matches_eager(exported, name):
    for batch in (1, 3):
        _assert_matches_eager(exported(name), "openvino", name, batch, seed=batch)


def _tied(inputs, name: str):
    """The same inputs with many exact ties: scores on a coarse grid, half the boxes
    repeated from their neighbour (equal IoUs, equal NMS ranks)."""
    config = MODES[name][0]
    tied = dict(inputs)
    if config.score_activation == "none":
        tied["logits"] = (inputs["logits"] * 4).round() / 4
    else:
        tied["logits"] = (inputs["logits"] * 2).round() / 2
    locs = inputs["locs"].clone()
    locs[:, 1::2] = locs[:, 0::2][:, : locs[:, 1::2].shape[1]]
    tied["locs"] = locs
    if "score_factor" in inputs:
        tied["score_factor"] = (inputs["score_factor"] * 2).round() / 2
    return tied


@pytest.mark.slow
@pytest.mark.parametrize(
    "runtime, tie_order",
    [
        pytest.param("onnxruntime", "graph", id="ort-graph"),
        pytest.param("onnxruntime", "runtime", id="ort-runtime"),  # ORT's TopK keeps the order
        pytest.param("openvino", "graph", id="ov-graph"),
    ],
)
@pytest.mark.parametrize("name", list(MODES))
def test_exact_ties_select_like_eager(exported, name, runtime, tie_order):
    """Equal scores everywhere: TopK's and NonMaxSuppression's index order is
    ssd_post's (lower flat index, lower slot), so the same candidates survive: the
    same (label, anchor) pairs per image. Their order may differ where a runtime's
    rounding (a ULP of a sigmoid) splits two scores that are equal in eager, or
    makes two equal; the scores stay within rtol 1e-6."""
    pytest.importorskip(runtime)
    run = ssd_onnx.load_runner(exported(name, tie_order), runtime)
    for batch in (1, 3):
        inputs = _tied(mode_inputs(name, batch, 20 + batch), name)
        got = run(*module_args(mode_module(name), inputs))
        want = eager_detections(name, inputs)
        torch.testing.assert_close(got.num_detections, want.num_detections, rtol=0, atol=0)
        assert int(want.num_detections.sum()) > 0
        for image, n in enumerate(want.num_detections.tolist()):

            def pairs(det):
                return sorted(
                    zip(det.labels[image, :n].tolist(), det.anchor_indices[image, :n].tolist())
                )

            assert pairs(got) == pairs(want), f"{name} B={batch} image {image}"
            torch.testing.assert_close(got.scores[image], want.scores[image], rtol=1e-6, atol=1e-7)


def test_decoded_boxes_inverted_suppress_nothing(tmp_path):
    """A decoded box with x2 < x1 has zero area in ssd_post and suppresses nothing;
    ONNX NonMaxSuppression would sort its corners, so the lowering hands it a
    zero-area box: the same survivors."""
    pytest.importorskip("onnxruntime")
    config = ssd_post.PostprocessConfig.from_preset(
        "yolov8", box_format="xyxy", score_thresh=0.1, nms_thresh=0.3
    )
    boxes = torch.tensor([[[10.0, 10, 50, 50], [50, 10, 10, 50], [12, 12, 48, 48]]])
    probs = torch.tensor([[[0.9], [0.8], [0.7]]])
    path = ssd_onnx.export_postprocess(None, config, str(tmp_path / "inv.onnx"), boxes, probs)
    got = ssd_onnx.load_runner(path, "onnxruntime")(boxes, probs)
    want = ssd_post.postprocess(boxes, probs, None, None, config)
    # The inverted box survives (it overlaps nothing) and the third is suppressed.
    assert want.num_detections.tolist() == [2]
    result = compare(got, want)
    assert result.ok, result.message


# ----------------------------------------------------------------------------- YOLO


def _yolo_prediction(batch: int, seed: int, anchors: int = 8400, nc: int = 80, nm: int = 0):
    """[B, 4 + nc + nm, N] like a trained YOLOv8: boxes in a 640 image, most class
    probabilities near 0, a few anchors confident."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 2, anchors, generator=generator) * 640
    sizes = torch.rand(batch, 2, anchors, generator=generator) * 120 + 4
    probs = torch.rand(batch, nc, anchors, generator=generator) ** 12
    extra = torch.randn(batch, nm, anchors, generator=generator)
    return torch.cat((centres, sizes, probs, extra), dim=1)


def _assert_yolo_rows(got: ssd_post.Detections, prediction, nms: dict, nc: int) -> None:
    """Image by image, the graph's first num_detections rows against
    non_max_suppression's rows (and anchor indices)."""
    rows, indices = ssd_post.non_max_suppression(prediction, nc=nc, return_idxs=True, **nms)
    total = 0
    for image, (want, want_index) in enumerate(zip(rows, indices)):
        n = int(got.num_detections[image])
        assert n == want.shape[0], f"image {image}: {n} rows, want {want.shape[0]}"
        torch.testing.assert_close(got.labels[image, :n], want[:, 5].long(), rtol=0, atol=0)
        torch.testing.assert_close(got.scores[image, :n], want[:, 4], rtol=1e-6, atol=0)
        torch.testing.assert_close(got.boxes[image, :n], want[:, :4], rtol=0, atol=1e-3)
        torch.testing.assert_close(got.anchor_indices[image, :n], want_index, rtol=0, atol=0)
        total += n
    assert total > 0


YOLO_REGIMES = {
    "prediction": dict(conf_thres=0.25, iou_thres=0.7, max_det=300),
    "validation": dict(conf_thres=0.001, iou_thres=0.7, max_det=300, multi_label=True),
}


@pytest.mark.parametrize("regime", list(YOLO_REGIMES))
def test_yolo_graph_small(tmp_path, regime):
    """A small YOLO head with mask coefficients (nm = 3) and an allow-list."""
    pytest.importorskip("onnxruntime")
    nms = dict(YOLO_REGIMES[regime], classes=[0, 2, 3, 9])
    example = _yolo_prediction(2, 0, anchors=300, nc=5, nm=3)
    path = ssd_onnx.export_yolo_postprocess(str(tmp_path / "y.onnx"), example, nc=5, **nms)
    run = ssd_onnx.load_runner(path, "onnxruntime")
    for batch in (1, 3):
        prediction = _yolo_prediction(batch, batch, anchors=300, nc=5, nm=3)
        _assert_yolo_rows(run(prediction), prediction, nms, nc=5)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
@pytest.mark.parametrize("regime", list(YOLO_REGIMES))
def test_yolo_graph_matches_non_max_suppression(tmp_path, runtime, regime):
    """[B, 84, 8400] predictions: the exported postprocess, run in onnxruntime and
    OpenVINO, gives non_max_suppression's rows in both regimes."""
    pytest.importorskip(runtime)
    nms = YOLO_REGIMES[regime]
    path = ssd_onnx.export_yolo_postprocess(str(tmp_path / "y.onnx"), _yolo_prediction(2, 0), **nms)
    run = ssd_onnx.load_runner(path, runtime)
    for batch in (1, 3):
        prediction = _yolo_prediction(batch, 10 + batch)
        _assert_yolo_rows(run(prediction), prediction, nms, nc=80)


def test_yolo_module_checks_its_arguments():
    example = _yolo_prediction(1, 0, anchors=10, nc=3)
    with pytest.raises(ValueError, match="nc should be in"):
        ssd_onnx.yolo_postprocess_module(example, nc=9)
    with pytest.raises(ValueError, match="classes should name at least one"):
        ssd_onnx.yolo_postprocess_module(example, classes=[7])
    with pytest.raises(ValueError, match="example_prediction should be"):
        ssd_onnx.yolo_postprocess_module(example[0])
    module = ssd_onnx.yolo_postprocess_module(example, multi_label=True)
    assert module.config.label_mode == "multi" and module.num_classes == 3
    got = detections_from_outputs(module(example))
    assert got.boxes.shape == (1, module.config.padded_detections(10, 3), 4)


def test_tie_order_is_checked(tmp_path):
    example = _yolo_prediction(2, 0, anchors=50, nc=3)
    with pytest.raises(ValueError, match="tie_order should be one of"):
        ssd_onnx.export_yolo_postprocess(str(tmp_path / "y.onnx"), example, tie_order="stable")
    assert ssd_onnx.fastest_exact_tie_order("onnxruntime") == "runtime"
    assert ssd_onnx.fastest_exact_tie_order("openvino") == "graph"


def test_graph_tie_order_refuses_a_topk_its_keys_cannot_order(tmp_path):
    """The graph's order key (dense rank * k + index rank) is 31-bit (OpenVINO's CPU
    runs int64 as int32): a top-k past 46340 is refused at export, naming the way out."""
    config = ssd_post.PostprocessConfig.from_preset("yolov8", topk_candidates=50000)
    locs = torch.rand(2, 50001, 4) * 10 + torch.tensor([0.0, 0.0, 10.0, 10.0])
    probs = torch.rand(2, 50001, 1)
    with pytest.raises(Exception, match="at most 46340"):
        ssd_onnx.export_postprocess(None, config, str(tmp_path / "big.onnx"), locs, probs)


@pytest.mark.slow  # the default opset (18) runs above
@pytest.mark.parametrize("opset", [19, 20, 21])
def test_family_graphs_at_every_supported_opset(tmp_path, opset):
    """The family's lowering (select_topk per level with a factor, batched_nms_padded
    class-agnostic with an allow-list) at the newer opsets, in onnxruntime and OpenVINO."""
    onnx = pytest.importorskip("onnx")
    name = "atss_agnostic_allow_list"
    config, _, levels, _ = MODES[name]
    example = mode_inputs(name, 2, 0)
    path = ssd_onnx.export_postprocess(
        mode_anchors(),
        config,
        str(tmp_path / "x.onnx"),
        example["locs"],
        example["logits"],
        example["image_sizes"],
        opset,
        level_sizes=levels,
        example_score_factor=example["score_factor"],
    )
    assert [o.version for o in onnx.load(path).opset_import if o.domain == ""] == [opset]
    for runtime in ("onnxruntime", "openvino"):
        _assert_matches_eager(path, runtime, name, 3, seed=opset)


def test_a_column_past_the_logits_is_refused_by_the_lowering(tmp_path):
    """export_module of a config whose background column is past C: the fake kernels
    do not look at columns, so the lowering itself refuses it (a graph built for the C
    columns would silently ignore it)."""
    from ssd_post.exportable import postprocess_module

    config = ssd_post.PostprocessConfig(
        score_activation="sigmoid", background_class=9, selection="per_level"
    )
    inputs = mode_inputs("retinanet", 2, 0)
    module, args = postprocess_module(
        mode_anchors(),
        config,
        inputs["locs"],
        inputs["logits"],
        inputs["image_sizes"],
        level_sizes=LEVELS,
    )
    with pytest.raises(Exception, match=r"background_class should be < C = 6, got 9"):
        ssd_onnx.export_module(module, args, str(tmp_path / "bad.onnx"))
