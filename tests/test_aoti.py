"""AOTInductor packages: the detector with ssd_post's postprocess, compiled ahead of
time, gives the eager detections in a fresh Python process and from C++ alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import ssd_post
from ssd_post import aoti

from common_utils import SSD300_GRIDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # each package is a C++ compilation of a minute or two


def _tiny_detector(checkpoint: str = "tiny_shapes.pt"):
    sys.path.insert(0, REPO)
    from models.checkpoint import load_detector

    return load_detector(os.path.join(REPO, "checkpoints", checkpoint)).eval()


def _images(batch: int, seed: int) -> torch.Tensor:
    model = _tiny_detector()
    h, w = model.image_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("aoti") / "tiny.pt2"
    return aoti.export_package(_tiny_detector(), str(path), _images(2, 0), max_batch=8)


def _eager(images: torch.Tensor):
    from ssd_post.exportable import DetectorModule

    with torch.no_grad():
        return DetectorModule(_tiny_detector()).eval()(images)


def _assert_same_detections(actual, expected, exact: bool) -> None:
    boxes, scores, labels, counts, anchors = actual
    e_boxes, e_scores, e_labels, e_counts, e_anchors = expected
    assert torch.equal(counts, e_counts) and torch.equal(labels, e_labels)
    assert torch.equal(anchors, e_anchors)
    if exact:
        assert torch.equal(scores, e_scores) and torch.equal(boxes, e_boxes)
    else:
        # Inductor fuses the network's convolutions and activations differently
        # from eager, so the logits (not the postprocess) differ in the last bits.
        torch.testing.assert_close(scores, e_scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(boxes, e_boxes, rtol=0, atol=1e-3)
    assert int(counts.sum()) > 0, "the inputs should give detections"


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch
    from ssd_post import aoti

    runner = aoti.load_package(sys.argv[1])
    out = {batch: runner(images) for batch, images in torch.load(sys.argv[2]).items()}
    torch.save(out, sys.argv[3])
""")


def test_package_in_a_fresh_process_matches_eager(tiny_package, tmp_path):
    inputs = {1: _images(1, 1), 3: _images(3, 2)}  # batches other than the example's
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            tiny_package,
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for batch, images in inputs.items():
        _assert_same_detections(out[batch], _eager(images), exact=False)


def test_postprocess_package_is_bit_exact(tmp_path):
    # The postprocess alone: Inductor only calls the op, so every bit is ssd_post's.
    anchors = ssd_post.DefaultBoxes.ssd300()((300, 300), SSD300_GRIDS)
    generator = torch.Generator().manual_seed(3)
    config = ssd_post.PostprocessConfig(score_thresh=0.05)

    def inputs(batch):
        locs = torch.randn(batch, anchors.shape[0], 4, generator=generator) * 0.2
        logits = torch.randn(batch, anchors.shape[0], 91, generator=generator) * 3
        sizes = torch.tensor([[300, 300]] * batch, dtype=torch.int64)
        return locs, logits, sizes

    path = aoti.export_postprocess_package(
        anchors, config, str(tmp_path / "post.pt2"), *inputs(2), max_batch=4
    )
    runner = aoti.load_package(path)
    for batch in (1, 3):
        args = inputs(batch)
        det = ssd_post.postprocess(args[0], args[1], anchors, args[2], config)
        expected = (det.boxes, det.scores, det.labels, det.num_detections, det.anchor_indices)
        _assert_same_detections(runner(*args), expected, exact=True)


def test_package_refuses_inputs_it_was_not_compiled_for(tiny_package):
    runner = aoti.load_package(tiny_package)
    h, w = _tiny_detector().image_size
    with pytest.raises(ValueError, match=r"input 0 should be float32 \[B, 3, "):
        runner(torch.randn(1, 3, h + 1, w))
    with pytest.raises(ValueError, match="float32"):
        runner(torch.randn(1, 3, h, w, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch should be in \[1, 8\]"):
        runner(torch.randn(9, 3, h, w))
    with pytest.raises(ValueError, match="takes 1 inputs"):
        runner(torch.randn(1, 3, h, w), torch.randn(1, 3, h, w))
    with pytest.raises(FileNotFoundError, match="no AOTInductor package"):
        aoti.load_package(tiny_package + ".missing")
    with pytest.raises(ValueError, match=r"\.pt2"):
        aoti.export_package(_tiny_detector(), "tiny.zip", _images(1, 0))
    with pytest.raises(TypeError, match="ExportableDetector .* got Linear"):
        aoti.export_package(torch.nn.Linear(2, 2), "x.pt2", _images(1, 0))


def _build_cpp_example(build_dir) -> str:
    torch_root = os.path.dirname(torch.__file__)
    for command in (
        [
            "cmake",
            "-S",
            os.path.join(REPO, "examples", "aoti_cpp"),
            "-B",
            str(build_dir),
            f"-DTORCH_ROOT={torch_root}",
            "-DCMAKE_BUILD_TYPE=Release",
        ],
        ["cmake", "--build", str(build_dir)],
    ):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return os.path.join(str(build_dir), "ssd_post_aoti")


def _parse_cpp_output(text: str, batch: int, k: int):
    boxes = torch.zeros(batch, k, 4)
    scores = torch.zeros(batch, k)
    labels = torch.zeros(batch, k, dtype=torch.int64)
    counts = torch.zeros(batch, dtype=torch.int64)
    anchors = torch.full((batch, k), -1, dtype=torch.int64)
    lines = iter(text.splitlines())
    for line in lines:
        _, image, n = line.split()
        image, n = int(image), int(n)
        counts[image] = n
        for row in range(n):
            label, score, *box, anchor = next(lines).split()
            labels[image, row] = int(label)
            scores[image, row] = float(score)  # %.9g: the float32 round-trips
            boxes[image, row] = torch.tensor([float(v) for v in box])
            anchors[image, row] = int(anchor)
    return boxes, scores, labels, counts, anchors


@pytest.fixture(scope="module")
def cpp_example(tmp_path_factory) -> str:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed: cannot build examples/aoti_cpp")
    return _build_cpp_example(tmp_path_factory.mktemp("aoti_cpp") / "build")


def _run_cpp(binary: str, package: str, images: torch.Tensor, folder) -> str:
    """The example's stdout for ``images`` [B, 3, H, W] written as raw float32."""
    images.numpy().tofile(folder / "images.f32")
    proc = subprocess.run(
        [
            binary,
            package,
            aoti.op_library_path(),
            str(folder / "images.f32"),
            *map(str, images.shape),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cpp_example_runs_a_per_level_package(cpp_example, tmp_path):
    """The same C++ program runs a per-level detector (the shipped tiny RetinaNet:
    FPN, sigmoid, per-level top-k, level sizes baked in) and prints the Python
    runner's detections bit for bit; those equal eager's on counts and labels."""
    from ssd_post.exportable import DetectorModule

    detector = _tiny_detector("tiny_shapes_retinanet.pt")
    assert detector.postprocess_config.selection == "per_level"
    h, w = detector.image_size
    generator = torch.Generator().manual_seed(5)
    example = torch.randn(2, 3, h, w, generator=generator)
    package = aoti.export_package(detector, str(tmp_path / "retina.pt2"), example, max_batch=4)
    images = torch.randn(3, 3, h, w, generator=generator)
    python = aoti.load_package(package)(images)
    k = python[0].shape[1]
    printed = _parse_cpp_output(_run_cpp(cpp_example, package, images, tmp_path), 3, k)
    _assert_same_detections(printed, python, exact=True)
    with torch.no_grad():
        _assert_same_detections(python, DetectorModule(detector).eval()(images), exact=False)


def test_cpp_example_prints_the_packages_detections(cpp_example, tiny_package, tmp_path):
    binary = cpp_example
    images = _images(3, 4)
    stdout = _run_cpp(binary, tiny_package, images, tmp_path)
    python = aoti.load_package(tiny_package)(images)
    k = python[0].shape[1]
    # The same compiled code as in Python: every printed bit equal.
    _assert_same_detections(_parse_cpp_output(stdout, 3, k), python, exact=True)

    # An image of another size is refused by name, not run.
    wrong = torch.randn(1, 3, images.shape[2] + 8, images.shape[3])
    wrong.numpy().tofile(tmp_path / "wrong.f32")
    proc = subprocess.run(
        [
            binary,
            tiny_package,
            aoti.op_library_path(),
            str(tmp_path / "wrong.f32"),
            *map(str, wrong.shape),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "unmatched dim value at 2" in proc.stderr, proc.stderr[-2000:]
