"""ONNX export of the postprocess: onnxruntime and OpenVINO return ssd_post's detections.

Exact up to each runtime's exp/softmax rounding: counts and labels equal, scores to
rtol 1e-6, boxes to 1e-3 px, exact score ties compared as sets (benchmarks.parity).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

import ssd_post  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from common_utils import onnx_inferred_shapes, onnx_value_dims  # noqa: E402
from benchmarks.parity import compare  # noqa: E402
from benchmarks.scenarios import MODELS, Inputs, make_inputs  # noqa: E402
from ssd_post import onnx as ssd_onnx  # noqa: E402
from ssd_post import onnx_lowering  # noqa: E402


def _runtime_or_skip(runtime: str) -> str:
    pytest.importorskip(runtime)
    return runtime


RUNTIME_PARAMS = [pytest.param("onnxruntime", id="ort"), pytest.param("openvino", id="ov")]


def _export_model_postprocess(name: str, path) -> str:
    """The postprocess of benchmark model ``name``, exported at B = 2."""
    example = make_inputs("sparse", name, 2, seed=99)
    return ssd_onnx.export_postprocess(
        example.anchors,
        example.config,
        str(path),
        example.locs,
        example.logits,
        example.image_sizes,
    )


@pytest.fixture(scope="module")
def toy_onnx(tmp_path_factory) -> str:
    return _export_model_postprocess("toy", tmp_path_factory.mktemp("onnx") / "toy.onnx")


@pytest.fixture(scope="module")
def ssd300_onnx(tmp_path_factory) -> str:
    return _export_model_postprocess("ssd300", tmp_path_factory.mktemp("onnx") / "ssd300.onnx")


@pytest.fixture(scope="module")
def ssdlite320_onnx(tmp_path_factory) -> str:
    return _export_model_postprocess(
        "ssdlite320", tmp_path_factory.mktemp("onnx") / "ssdlite320.onnx"
    )


def _outputs(det: ssd_post.Detections):
    return det.boxes, det.scores, det.labels, det.num_detections, det.anchor_indices


def _assert_same_shapes(got: ssd_post.Detections, want: ssd_post.Detections) -> None:
    """Every output of the graph has the eager op's shape and dtype (K included)."""
    for name, g, w in zip(ssd_onnx.DETECTION_OUTPUTS, _outputs(got), _outputs(want)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name


def _assert_runtime_matches(path: str, runtime: str, scenario: str, model: str, batch: int) -> None:
    run = ssd_onnx.load_runner(path, _runtime_or_skip(runtime))
    inp = make_inputs(scenario, model, batch, seed=batch)
    got = run(inp.locs, inp.logits, inp.image_sizes)
    want = ssd_post.postprocess(inp.locs, inp.logits, inp.anchors, inp.image_sizes, inp.config)
    assert got.boxes.dtype == torch.float32 and got.labels.dtype == torch.int64
    _assert_same_shapes(got, want)
    result = compare(got, want)
    assert result.ok, result.message
    assert result.detections > 0  # the comparison saw detections


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
@pytest.mark.parametrize("scenario", ["sparse", "dense"])
@pytest.mark.parametrize(
    "batch", [1, pytest.param(3, marks=pytest.mark.slow)]
)  # exported at B = 2: the batch is dynamic (B = 3 in the slow tier)
def test_toy_matches_ssd_post(toy_onnx, runtime, scenario, batch):
    _assert_runtime_matches(toy_onnx, runtime, scenario, "toy", batch)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
@pytest.mark.parametrize("scenario", ["sparse", "dense"])
@pytest.mark.parametrize("batch", [1, 3])
def test_ssd300_matches_ssd_post(ssd300_onnx, runtime, scenario, batch):
    _assert_runtime_matches(ssd300_onnx, runtime, scenario, "ssd300", batch)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
@pytest.mark.parametrize("scenario", ["sparse", "dense"])
@pytest.mark.parametrize("batch", [1, 3])
def test_ssdlite320_matches_ssd_post(ssdlite320_onnx, runtime, scenario, batch):
    _assert_runtime_matches(ssdlite320_onnx, runtime, scenario, "ssdlite320", batch)


# ----------------------------------------------------------------------------- small K

# Three classes and topk_candidates 10: K = min(200, C_fg * 10) is 20 with a background
# column and 30 without, below detections_per_img = 200.
SMALL_CLASSES = 3


def _small_inputs(batch: int, seed: int, background_class) -> Inputs:
    anchors = MODELS["toy"].make_anchors()
    gen = torch.Generator().manual_seed(seed)
    size = MODELS["toy"].image_size
    return Inputs(
        0.5 * torch.randn(batch, anchors.shape[0], 4, generator=gen),
        2.0 * torch.randn(batch, anchors.shape[0], SMALL_CLASSES, generator=gen),
        anchors,
        torch.full((batch, 2), size, dtype=torch.int64),
        ssd_post.PostprocessConfig(
            score_thresh=0.2,
            topk_candidates=10,
            detections_per_img=200,
            background_class=background_class,
        ),
    )


def _export_small(inp: Inputs, path) -> str:
    return ssd_onnx.export_postprocess(
        inp.anchors, inp.config, str(path), inp.locs, inp.logits, inp.image_sizes
    )


def _eager(inp: Inputs) -> ssd_post.Detections:
    return ssd_post.postprocess(inp.locs, inp.logits, inp.anchors, inp.image_sizes, inp.config)


@pytest.mark.parametrize("background_class", [0, "last", None])
def test_graph_shape_contract_small_k(tmp_path, background_class):
    """The graph itself computes the op's K: ONNX shape inference of the exported graph,
    with the exporter's declared output shapes erased, gives eager's shapes and dtypes
    and keeps the batch dynamic. No runtime runs."""
    onnx = pytest.importorskip("onnx")
    inp = _small_inputs(2, seed=11, background_class=background_class)
    want = _eager(inp)
    k = inp.config.padded_detections(inp.logits.shape[1], SMALL_CLASSES)
    assert want.boxes.shape[1] == k < inp.config.detections_per_img  # the case that matters
    declared, outputs, input_dims = onnx_inferred_shapes(
        _export_small(inp, tmp_path / "small.onnx")
    )
    batch = input_dims[0]
    assert isinstance(batch, str) and batch  # a named, dynamic batch
    assert [o.name for o in outputs] == list(ssd_onnx.DETECTION_OUTPUTS)
    for output, tensor in zip(outputs, _outputs(want)):
        shape = [batch] + list(tensor.shape[1:])
        assert onnx_value_dims(output) == shape, output.name
        assert declared[output.name] == shape, output.name
        dtype = onnx.helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type)
        assert dtype == tensor.numpy().dtype, output.name


@pytest.mark.parametrize("background_class", [0, "first", "last", None])
def test_small_k_matches_ssd_post(tmp_path, background_class):
    """onnxruntime runs the graph exported at B = 2 at B = 1 and 3: eager's shapes
    (K < detections_per_img) and detections, with background_class names resolved."""
    _runtime_or_skip("onnxruntime")
    path = _export_small(
        _small_inputs(2, seed=11, background_class=background_class), tmp_path / "s.onnx"
    )
    run = ssd_onnx.load_runner(path, "onnxruntime")
    for batch in (1, 3):
        inp = _small_inputs(batch, seed=batch, background_class=background_class)
        got, want = run(inp.locs, inp.logits, inp.image_sizes), _eager(inp)
        _assert_same_shapes(got, want)
        result = compare(got, want)
        assert result.ok, result.message
        assert result.detections > 0
        background = inp.config.resolve_background_class(SMALL_CLASSES)
        real = torch.arange(got.labels.shape[1]) < got.num_detections[:, None]
        assert background is None or not bool((got.labels[real] == background).any())


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_sigmoid_without_background(tmp_path, runtime):
    inp = make_inputs("dense", "toy", 2, seed=5)
    config = ssd_post.PostprocessConfig(
        score_activation="sigmoid", background_class=None, score_thresh=0.3, detections_per_img=50
    )
    path = ssd_onnx.export_postprocess(
        inp.anchors, config, str(tmp_path / "sig.onnx"), inp.locs, inp.logits, inp.image_sizes
    )
    got = ssd_onnx.load_runner(path, _runtime_or_skip(runtime))(
        inp.locs, inp.logits, inp.image_sizes
    )
    want = ssd_post.postprocess(inp.locs, inp.logits, inp.anchors, inp.image_sizes, config)
    result = compare(got, want)
    assert result.ok, result.message
    assert bool((got.labels[:, :1] >= 0).all()) and result.detections > 0


def test_decode_threshold_flatten_lowering(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    inp = make_inputs("dense", "toy", 2, seed=3)

    class Stage(torch.nn.Module):
        def forward(self, locs, logits, sizes):
            return ssd_post.decode_threshold_flatten(locs, logits, inp.anchors, sizes, inp.config)

    program = torch.onnx.export(
        Stage().eval(),
        (inp.locs, inp.logits, inp.image_sizes),
        dynamo=True,
        custom_translation_table=ssd_onnx.translation_table(),
    )
    path = str(tmp_path / "dtf.onnx")
    program.save(path, external_data=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = dict(zip(names, (inp.locs.numpy(), inp.logits.numpy(), inp.image_sizes.numpy())))
    boxes, scores, keys = (torch.from_numpy(o) for o in session.run(None, feeds))
    want_boxes, want_scores, want_keys = ssd_post.decode_threshold_flatten(
        inp.locs, inp.logits, inp.anchors, inp.image_sizes, inp.config
    )
    assert keys.numel() > 0
    torch.testing.assert_close(keys, want_keys, rtol=0, atol=0)
    torch.testing.assert_close(scores, want_scores, rtol=1e-6, atol=0)
    torch.testing.assert_close(boxes, want_boxes, rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def tiny_detector():
    from models.checkpoint import load_detector

    return load_detector("checkpoints/tiny_shapes.pt").eval()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_tiny_model_end_to_end(tiny_detector, tmp_path, runtime):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn((2, 3) + tiny_detector.image_size, generator=gen)
    path = ssd_onnx.export(tiny_detector, str(tmp_path / "tiny.onnx"), images)
    run = ssd_onnx.load_runner(path, _runtime_or_skip(runtime))
    test_images = torch.randn((3, 3) + tiny_detector.image_size, generator=gen)
    got = run(test_images)
    want = tiny_detector.predict(test_images)
    # The convolutions are the runtime's own: the head outputs differ by float rounding,
    # so compare what that rounding cannot move: counts of confident detections and boxes.
    assert got.boxes.shape == want.boxes.shape
    result = compare(got, want)
    assert result.detections > 0
    confident_got = (got.scores > 0.3).sum(1)
    confident_want = (want.scores > 0.3).sum(1)
    torch.testing.assert_close(confident_got, confident_want, rtol=0, atol=0)
    top = slice(0, 5)
    torch.testing.assert_close(got.labels[:, top], want.labels[:, top], rtol=0, atol=0)
    torch.testing.assert_close(got.boxes[:, top], want.boxes[:, top], rtol=0, atol=1e-2)


@pytest.mark.slow  # the default opset (18) is tested in the fast tier above
@pytest.mark.parametrize("opset", [ssd_onnx.SUPPORTED_OPSETS[-1]])
def test_newest_supported_opset(tmp_path, opset):
    onnx = pytest.importorskip("onnx")
    inp = make_inputs("dense", "toy", 2, seed=7)
    path = ssd_onnx.export_postprocess(
        inp.anchors,
        inp.config,
        str(tmp_path / "x.onnx"),
        inp.locs,
        inp.logits,
        inp.image_sizes,
        opset=opset,
    )
    assert [o.version for o in onnx.load(path).opset_import if o.domain == ""] == [opset]
    got = ssd_onnx.load_runner(path, _runtime_or_skip("onnxruntime"))(
        inp.locs, inp.logits, inp.image_sizes
    )
    result = compare(
        got, ssd_post.postprocess(inp.locs, inp.logits, inp.anchors, inp.image_sizes, inp.config)
    )
    assert result.ok and result.detections > 0, result.message


# ----------------------------------------------------------------------------- bad input


def test_unsupported_opset_is_refused(tmp_path):
    inp = make_inputs("sparse", "toy", 1)
    with pytest.raises(ValueError, match="opset should be one of .* got 11"):
        ssd_onnx.export_postprocess(
            inp.anchors,
            inp.config,
            str(tmp_path / "x.onnx"),
            inp.locs,
            inp.logits,
            inp.image_sizes,
            opset=11,
        )


def test_model_without_ssd_post_postprocess_is_refused(tmp_path):
    with pytest.raises(TypeError, match="ExportableDetector .* got Linear"):
        ssd_onnx.export(torch.nn.Linear(2, 2), str(tmp_path / "x.onnx"), torch.zeros(1, 3, 8, 8))


def test_background_out_of_range_is_refused(tmp_path):
    inp = make_inputs("sparse", "toy", 1)
    config = ssd_post.PostprocessConfig(background_class=MODELS["toy"].num_classes)
    with pytest.raises(ValueError, match="background_class should be < C = 11, got 11"):
        ssd_onnx.export_postprocess(
            inp.anchors, config, str(tmp_path / "x.onnx"), inp.locs, inp.logits, inp.image_sizes
        )


def test_unknown_runtime_is_refused(toy_onnx):
    with pytest.raises(ValueError, match="runtime should be one of .* got 'tensorrt'"):
        ssd_onnx.load_runner(toy_onnx, "tensorrt")


def test_missing_runtime_names_the_package(monkeypatch, toy_onnx):
    real_import = onnx_lowering.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "openvino":
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(onnx_lowering.importlib, "import_module", fake_import)
    with pytest.raises(ImportError, match=r"'openvino' package: pip install ssd-post\[export\]"):
        ssd_onnx.load_runner(toy_onnx, "openvino")


def test_batched_nms_has_no_lowering(tmp_path):
    class Nms(torch.nn.Module):
        def forward(self, boxes, scores, idxs):
            return ssd_post.batched_nms(boxes, scores, idxs, 0.5)

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
    with pytest.raises(Exception, match="batched_nms has no exact ONNX lowering"):
        torch.onnx.export(
            Nms().eval(),
            (boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0])),
            dynamo=True,
            custom_translation_table=ssd_onnx.translation_table(),
        )


@pytest.mark.slow  # a fresh Python process
def test_import_ssd_post_does_not_import_onnx():
    code = "import sys, ssd_post; print('onnx' in sys.modules or 'onnxscript' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_args, with_aoti",
    [
        pytest.param([], True, id="tiny_ssd"),
        # The per-level RetinaNet (select_topk and batched_nms_padded lowered); its
        # AOTInductor run is tests/test_evaluate.py's.
        pytest.param(
            [
                "--config",
                "configs/tiny_shapes_retinanet.yaml",
                "--checkpoint",
                "checkpoints/tiny_shapes_retinanet.pt",
            ],
            False,
            id="tiny_retinanet",
        ),
    ],
)
def test_evaluate_backends_agree_on_map(tmp_path, model_args, with_aoti):
    """evaluate.py --backend: the same COCO numbers in PyTorch, onnxruntime, OpenVINO and
    AOTInductor packages, for the SSD checkpoint and the per-level one.

    Each backend runs as its own `python evaluate.py` process, as a user runs it: the
    runtimes' thread pools never share a process with later tests that fork."""
    backends = ["pytorch"] + [b for b in ssd_onnx.RUNTIMES if _installed(b)]
    backends += ["aoti"] if with_aoti else []
    data_root = tmp_path / "shapes"
    stats = {}
    for backend in backends:
        out = tmp_path / f"{backend}.json"
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO_ROOT, "evaluate.py"),
                *model_args,
                "--backend",
                backend,
                "--limit",
                "24",
                "--batch-size",
                "8",
                "--data-root",
                str(data_root),
                "--json",
                str(out),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads(out.read_text())
        assert metrics["backend"] == backend and metrics["num_images"] == 24
        stats[backend] = metrics["stats"]
    assert len(stats) > 1 and stats["pytorch"][0] > 0.1  # a trained model, something to agree on
    for backend in backends[1:]:
        torch.testing.assert_close(
            torch.tensor(stats[backend]), torch.tensor(stats["pytorch"]), rtol=0, atol=1e-3
        )


def test_evaluate_missing_runtime_is_one_line(monkeypatch, capsys):
    import evaluate

    real_import = onnx_lowering.importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(onnx_lowering.importlib, "import_module", fake_import)
    assert evaluate.main(["--backend", "onnxruntime", "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'onnxruntime' package: pip install ssd-post[export]" in err


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
