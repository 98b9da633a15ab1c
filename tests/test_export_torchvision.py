"""torchvision detectors and the exporter contract.

``ssd_post.onnx.export`` and ``ssd_post.aoti.export_package`` take any
``ssd_post.exportable.ExportableDetector`` and torchvision's SSD, SSDLite, RetinaNet
and FCOS. For a torchvision model the exported module is ``model(list(images))`` of
the model patched with ``ssd_post.patch_torchvision`` at one input size: its
normalisation, resize and padding, backbone and head, ssd_post's postprocess, boxes
back in the input's pixels. Fast: that module in eager equals the patched model bit
for bit (B = 1 and 3), and ``torch.export`` keeps the shape contract. Slow:
AOTInductor packages and ONNX graphs (onnxruntime, OpenVINO, each in its own
process) of the models, exported at B = 2, run at B = 1 and 3.

The models have random weights (nothing is downloaded) with seeded noise on the
classification heads, so scores are spread out rather than tied.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
from collections import OrderedDict
from typing import Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

import ssd_post
from ssd_post.exportable import (
    DetectorModule,
    ExportableDetector,
    batch_dynamic_shapes,
    detections_from_outputs,
    exportable_module,
)
from ssd_post.torchvision_export import TorchvisionDetectorModule

from common_utils import assert_same_detections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 5  # background included for SSD

# Input (h, w) of each model's images, chosen so that the transform resizes them
# (and pads RetinaNet's and FCOS's batch to multiples of 32):
#   ssd:        fixed size (160, 128) -> 128 x 160 (h, w), no padding
#   ssdlite:    fixed 320 x 320
#   retinanet, fcos: min_size 64, max_size 96: 64 x 100 -> 61 x 96 -> padded 64 x 96
IMAGE_SIZES = {"ssd": (96, 150), "ssdlite": (96, 150), "retinanet": (64, 100), "fcos": (64, 100)}
# Enough detections to compare, fewer than detections_per_img in each image, and no
# score of the tests' images within 3e-5 of the threshold (a graph's or a package's
# network rounding moves scores by up to about 2e-5 relative).
SCORE_THRESH = {"ssd": 0.8, "ssdlite": 0.97, "retinanet": 0.1525, "fcos": 0.49}
NAMES = list(IMAGE_SIZES)


class TinySSDBackbone(nn.Module):
    """Three feature maps at strides 8, 16, 32 (a torchvision SSD's backbone is any
    module giving an OrderedDict of them; VGG16 at 300 x 300 is too slow for here)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(self._block(3, 16), self._block(16, 32))
        self.levels = nn.ModuleList([self._block(32, 32) for _ in range(3)])
        self.out_channels = [32, 32, 32]

    @staticmethod
    def _block(inputs: int, outputs: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.stem(x)
        features = OrderedDict()
        for index, level in enumerate(self.levels):
            x = level(x)
            features[str(index)] = x
        return features


def _he_normal_(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draws every convolution of ``module`` with He-normal weights."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(
                torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
            )


def _class_output_convs(model: nn.Module) -> List[nn.Conv2d]:
    """The convolutions that give the class logits (one per level for SSD's head)."""
    head = model.head.classification_head
    if hasattr(head, "cls_logits"):  # RetinaNet, FCOS
        return [head.cls_logits]
    return [
        [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1] for layer in head.module_list
    ]


@torch.no_grad()
def _spread_class_scores(model: nn.Module, seed: int, redraw_backbone: bool) -> None:
    """Random initial weights give nearly equal class scores: seeded noise on the
    class output convolutions spreads them, so the order of the detections is decided
    by the values, not by exact ties. SSDLite's features even fade to about 1e-14
    through its backbone, and RetinaNet's std-0.01 class tower leaves every anchor
    its prior: ``redraw_backbone`` re-draws those He-style first."""
    generator = torch.Generator().manual_seed(seed)
    if redraw_backbone:
        _he_normal_(model.backbone, generator)
        if hasattr(model.head.classification_head, "conv"):  # RetinaNet's and FCOS's tower
            _he_normal_(model.head.classification_head.conv, generator)
    for conv in _class_output_convs(model):
        conv.weight.copy_(
            torch.randn(conv.weight.shape, generator=generator) * conv.weight.std() * 10
        )
        conv.bias.add_(torch.randn(conv.bias.shape, generator=generator))


def _build(name: str) -> nn.Module:
    """A torchvision detector with random weights, in eval mode, unpatched."""
    with torch.random.fork_rng():  # seeded initial weights, the global generator untouched
        torch.manual_seed(0)
        if name == "ssd":
            backbone, anchors = TinySSDBackbone(), DefaultBoxGenerator([[2], [2, 3], [2]])
            model = SSD(backbone, anchors, (160, 128), CLASSES)
        elif name == "ssdlite":
            model = detection.ssdlite320_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=CLASSES
            )
        else:
            # torchvision's RetinaNet and FCOS classes with their own heads, transform and
            # anchor generator, on three small levels instead of ResNet-50 + FPN (whose
            # AOTInductor compile alone took 60 to 75 s here).
            backbone = TinySSDBackbone()
            backbone.out_channels = 32  # one channel count for every level, as both heads want
            if name == "retinanet":
                sizes = tuple(
                    (s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (16, 32, 64)
                )
                anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 3)
                model = RetinaNet(
                    backbone, CLASSES, min_size=64, max_size=96, anchor_generator=anchors
                )
            else:
                anchors = AnchorGenerator(((16,), (32,), (64,)), ((1.0,),) * 3)
                model = FCOS(backbone, CLASSES, min_size=64, max_size=96, anchor_generator=anchors)
    _spread_class_scores(model, seed=7, redraw_backbone=name != "ssd")
    model.score_thresh = SCORE_THRESH[name]
    return model.eval()


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    """The detector of ``name``, patched with ssd_post.patch_torchvision (built once)."""
    return ssd_post.patch_torchvision(_build(name))


@functools.lru_cache(maxsize=None)
def _module(name: str) -> TorchvisionDetectorModule:
    """The exportable module of ``_model(name)`` at its image size."""
    return exportable_module(_model(name), _images(name, 2, seed=0)).eval()


def _images(name: str, batch: int, seed: int) -> Tensor:
    """Images [batch, 3, H, W] in [0, 1] at the model's input size."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch, 3) + IMAGE_SIZES[name], generator=generator)


def _patched_detections(name: str, images: Tensor, padded: int) -> ssd_post.Detections:
    """``model(list(images))`` of the patched eager model, padded to ``padded`` rows."""
    with torch.no_grad():
        return ssd_post.Detections.from_list(_model(name)(list(images)), padded)


def _padded(name: str) -> int:
    module = _module(name)
    return module.config.padded_detections(module.anchors.shape[0], module.num_classes)


# ----------------------------------------------------------------------------- eager


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_module_equals_the_patched_model(name, batch):
    images = _images(name, batch, seed=batch)
    with torch.no_grad():
        got = detections_from_outputs(_module(name)(images))
    want = _patched_detections(name, images, _padded(name))
    counts = want.num_detections
    assert int(counts.min()) > 0 and int(counts.max()) < _model(name).detections_per_img
    got.anchor_indices = None  # the torchvision dicts have none
    # Bit for bit: the same normalisation, interpolate, padding, network and
    # postprocess; the box scale is resize_boxes' float32 ratio.
    assert_same_detections(got, want)


@pytest.mark.parametrize("name", NAMES)
def test_module_reads_the_transform(name):
    """The sizes fixed at export are those torchvision's transform gives the images."""
    model, module = _model(name), _module(name)
    images = _images(name, 2, seed=0)
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
    assert [tuple(s) for s in image_list.image_sizes] == [module.resized_size] * 2
    assert tuple(image_list.tensors.shape[-2:]) == module.batch_image_size
    assert module.config == ssd_post.PostprocessConfig.from_torchvision(model)
    assert (module.level_sizes is None) == isinstance(model, SSD)
    assert module.has_score_factor == (name == "fcos")


def _export_dynamic_batch(module: nn.Module, example: Tensor):
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        return torch.export.export(
            module, (example,), dynamic_shapes=batch_dynamic_shapes(module, (example,), batch)
        )


@pytest.mark.parametrize(
    "name",
    # The tiny SSD here; tracing the larger networks takes 5 to 15 s each (the
    # protocol test below exports a per-level head with a score factor in the fast tier).
    ["ssd"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("ssdlite", "retinanet", "fcos")],
)
def test_exported_program_keeps_the_shape_contract(name):
    module = _module(name)
    program = _export_dynamic_batch(module, _images(name, 2, seed=0))
    padded = _padded(name)
    assert padded <= module.config.detections_per_img
    for batch in (1, 3):
        images = _images(name, batch, seed=batch)
        with torch.no_grad():
            outputs = program.module()(images)
            want = module(images)
        boxes, scores, labels, counts, anchor_indices = outputs
        assert boxes.shape == (batch, padded, 4) and boxes.dtype == torch.float32
        assert scores.shape == labels.shape == anchor_indices.shape == (batch, padded)
        assert scores.dtype == torch.float32 and counts.shape == (batch,)
        assert labels.dtype == counts.dtype == anchor_indices.dtype == torch.int64
        assert_same_detections(detections_from_outputs(outputs), detections_from_outputs(want))


# ----------------------------------------------------------------------------- protocol


class GridDetector(nn.Module):
    """An ExportableDetector defined here (not the repository's models): an FCOS-like
    head on two levels of a tiny network, with a centerness factor as its third
    output and level sizes from postprocess_inputs()."""

    image_size = (32, 48)
    strides = (8, 16)

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(3)
            self.stem = nn.Conv2d(3, 8, 3, stride=8, padding=1)
            self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.out = nn.Conv2d(8, 4 + CLASSES + 1, 1)
        self.postprocess_config = ssd_post.PostprocessConfig(
            score_thresh=0.3,
            nms_thresh=0.6,
            topk_candidates=20,
            detections_per_img=15,
            score_activation="sigmoid",
            background_class=None,
            selection="per_level",
            score_factor_mode="sqrt",
            box_coder="linear",
        )

    def _grids(self) -> List[Tuple[int, int]]:
        return [(self.image_size[0] // s, self.image_size[1] // s) for s in self.strides]

    def anchors(self) -> Tensor:
        """Stride-sized boxes centred on each cell, level by level."""
        levels = []
        for (h, w), stride in zip(self._grids(), self.strides):
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            centres = torch.stack((xs, ys), -1).reshape(-1, 2).float() * stride + stride / 2
            levels.append(torch.cat((centres - stride / 2, centres + stride / 2), dim=1))
        return torch.cat(levels)

    def postprocess_inputs(self) -> Dict[str, List[int]]:
        return {"level_sizes": [h * w for h, w in self._grids()]}

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        first = torch.relu(self.stem(images))
        outputs = [self.out(f).flatten(2).mT for f in (first, torch.relu(self.down(first)))]
        out = torch.cat(outputs, dim=1)  # [B, A, 4 + C + 1]
        return out[..., :4].abs(), out[..., 4 : 4 + CLASSES] * 4, out[..., 4 + CLASSES :]


def test_a_protocol_detector_with_a_score_factor():
    detector = GridDetector().eval()
    assert isinstance(detector, ExportableDetector)
    images = torch.randn((2, 3) + detector.image_size, generator=torch.Generator().manual_seed(0))
    module = exportable_module(detector, images)
    assert isinstance(module, DetectorModule)
    with torch.no_grad():
        locs, logits, factor = detector(images)
        want = ssd_post.postprocess(
            locs,
            logits,
            detector.anchors(),
            torch.tensor([detector.image_size] * 2),
            detector.postprocess_config,
            score_factor=factor,
            **detector.postprocess_inputs(),
        )
        got = detections_from_outputs(module(images))
        exported = detections_from_outputs(_export_dynamic_batch(module, images).module()(images))
    assert int(want.num_detections.sum()) > 0
    assert_same_detections(got, want)
    assert_same_detections(exported, want)


# ----------------------------------------------------------------------------- bad input


def test_a_model_that_is_neither_is_refused_by_name(tmp_path):
    from torchvision.models import resnet18

    from ssd_post import aoti

    images = torch.rand(1, 3, 32, 32)
    for model, missing in (
        (nn.Linear(2, 2), "postprocess_config, anchors(), image_size"),
        (resnet18(), "postprocess_config"),  # torchvision's, but no detector
    ):
        expected = (
            r"ExportableDetector .* or be a torchvision SSD, SSDLite, RetinaNet or FCOS; "
            rf"got {type(model).__name__}, which is neither: it lacks {re.escape(missing)}"
        )
        with pytest.raises(TypeError, match=expected):
            aoti.export_package(model, str(tmp_path / "x.pt2"), images)
    wrong = GridDetector()
    wrong.postprocess_config = {"score_thresh": 0.5}
    with pytest.raises(
        TypeError, match=r"lacks postprocess_config as a PostprocessConfig \(it is a dict\)"
    ):
        exportable_module(wrong, torch.rand((1, 3) + wrong.image_size))
    with pytest.raises(TypeError, match="ExportableDetector .* got Linear, which lacks"):
        DetectorModule(nn.Linear(2, 2))


def test_a_torchvision_model_in_training_mode_is_refused():
    model = _build("ssd").train()
    with pytest.raises(ValueError, match=r"SSD is in training mode .* call model.eval\(\)"):
        exportable_module(model, _images("ssd", 1, seed=0))


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 96, 150), r"got shape \(3, 96, 150\)"),
        ((1, 1, 96, 150), r"got shape \(1, 1, 96, 150\)"),
        ((0, 3, 96, 150), r"got shape \(0, 3, 96, 150\)"),
    ],
)
def test_example_images_of_the_wrong_shape_are_refused(shape, message):
    with pytest.raises(
        ValueError, match=rf"example_images should be a Tensor\[B, 3, H, W\] .* {message}"
    ):
        exportable_module(_model("ssd"), torch.rand(shape))


def test_example_images_of_the_wrong_kind_are_refused():
    with pytest.raises(
        ValueError, match="example_images should be floating point, got torch.uint8"
    ):
        exportable_module(_model("ssd"), torch.zeros(1, 3, 96, 150, dtype=torch.uint8))
    with pytest.raises(ValueError, match="example_images should be a Tensor.* got list"):
        exportable_module(_model("ssd"), [torch.rand(3, 96, 150)])
    detector = GridDetector()
    with pytest.raises(
        ValueError, match=r"at the detector's image_size \(32, 48\) \(h, w\), got \(32, 40\)"
    ):
        exportable_module(detector, torch.rand(1, 3, 32, 40))


def test_images_of_another_size_are_refused():
    with pytest.raises(
        ValueError, match=r"images should be Tensor\[B, 3, 96, 150\] .* got \(1, 3, 96, 151\)"
    ):
        _module("ssd")(torch.rand(1, 3, 96, 151))


# ----------------------------------------------------------------------------- AOTInductor


def _assert_close_detections(name: str, got: ssd_post.Detections, images: Tensor) -> None:
    """``got`` (from a package or a graph) against eager for ``images``: counts,
    labels and anchor indices equal, scores to rtol 5e-5, boxes to 1e-3 px.

    A package or a graph computes the network its own way (Inductor's fused
    convolutions and normalisations, a runtime's kernels): the head outputs already
    differ from eager in the last bits (logits by about 3e-6 in the tiny SSD's
    package), and the detections by up to about 2e-5 relative in scores and 1e-5 px
    in boxes on these models (RetinaNet and FCOS, whose re-drawn class towers give
    large logits, the most). The postprocess alone is exact in a package
    (tests/test_aoti_family.py) and within rtol 1e-6 in a graph
    (tests/test_onnx_family.py)."""
    want = _patched_detections(name, images, _padded(name))
    assert got.boxes.shape == want.boxes.shape
    torch.testing.assert_close(got.num_detections, want.num_detections, rtol=0, atol=0)
    torch.testing.assert_close(got.labels, want.labels, rtol=0, atol=0)
    torch.testing.assert_close(got.scores, want.scores, rtol=5e-5, atol=0)
    torch.testing.assert_close(got.boxes, want.boxes, rtol=0, atol=1e-3)
    with torch.no_grad():  # the eager module's, as the torchvision dicts have none
        anchor_indices = _module(name)(images)[4]
    torch.testing.assert_close(got.anchor_indices, anchor_indices, rtol=0, atol=0)
    assert int(want.num_detections.sum()) > 0


@pytest.mark.slow  # a C++ compilation of the whole network
@pytest.mark.parametrize("name", ["retinanet", "fcos", "ssd"])
def test_aoti_package_equals_eager(name, tmp_path):
    from ssd_post import aoti

    path = aoti.export_package(
        _model(name), str(tmp_path / f"{name}.pt2"), _images(name, 2, seed=0), max_batch=4
    )
    runner = aoti.load_package(path)
    for batch in (1, 3):
        images = _images(name, batch, seed=10 + batch)
        _assert_close_detections(name, detections_from_outputs(runner(images)), images)


# ----------------------------------------------------------------------------- ONNX

# A runtime's thread pool in the pytest process can break a later test that forks:
# each runtime runs in a process of its own.
RUN_ONNX = textwrap.dedent("""
    import sys
    import torch
    from ssd_post import onnx as ssd_onnx

    session = ssd_onnx.load_session(sys.argv[1], sys.argv[2])
    out = {batch: session(images) for batch, images in torch.load(sys.argv[3]).items()}
    torch.save(out, sys.argv[4])
""")


def _run_onnx(path: str, runtime: str, inputs: Dict[int, Tensor], folder) -> Dict[int, tuple]:
    """The graph's outputs for each batch of ``inputs``, from ``runtime`` in a fresh
    Python process."""
    torch.save(inputs, folder / "inputs.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_ONNX,
            path,
            runtime,
            str(folder / "inputs.pt"),
            str(folder / "out.pt"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(folder / "out.pt")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory) -> Dict[str, object]:
    """name -> the model's .onnx file, exported once (at B = 2) for both runtimes."""
    return {"folder": tmp_path_factory.mktemp("onnx")}


def _exported_onnx(name: str, files: Dict[str, object]) -> str:
    """``ssd_post.onnx.export`` of the model at B = 2 (once per module)."""
    ssd_onnx = pytest.importorskip("ssd_post.onnx")
    pytest.importorskip("onnxscript")
    if name not in files:
        files[name] = ssd_onnx.export(
            _model(name), str(files["folder"] / f"{name}.onnx"), _images(name, 2, seed=0)
        )
    return files[name]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("name", ["ssd", "retinanet", "fcos"])
def test_onnx_graph_equals_eager(name, runtime, onnx_files, tmp_path):
    pytest.importorskip(runtime)
    path = _exported_onnx(name, onnx_files)
    inputs = {batch: _images(name, batch, seed=20 + batch) for batch in (1, 3)}
    outputs = _run_onnx(path, runtime, inputs, tmp_path)
    for batch, images in inputs.items():
        _assert_close_detections(name, detections_from_outputs(outputs[batch]), images)


@pytest.mark.slow  # a fresh Python process
def test_the_exporters_import_torchvision_only_for_a_torchvision_model():
    code = (
        "import sys, ssd_post, ssd_post.exportable, ssd_post.aoti; "
        "print('torchvision' in sys.modules, 'ssd_post.torchvision_export' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
