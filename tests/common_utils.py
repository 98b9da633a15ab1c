"""Helpers shared by the test modules (imported as ``from common_utils import ...``).

Fixtures stay in ``conftest.py``; plain functions and constants live here, so a test
module imports what it uses instead of reaching into ``conftest``.
"""

from __future__ import annotations

import pytest
import torch

import ssd_post

# Feature-map sizes of SSD300-VGG16 (8732 anchors with DefaultBoxes.ssd300()).
SSD300_GRIDS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]

# What every test that touches a CUDA device carries: the `cuda` mark, so that
# `pytest -m cuda` (make gpu-check) selects it, and a skip where there is no device.
CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
)


def needs_cuda(test):
    """Decorator of a test that runs on a CUDA device only (see CUDA_MARKS)."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


def cpu_and_cuda():
    """Values of a ``device`` parameter: "cpu", and "cuda" with CUDA_MARKS.

    Use as ``@pytest.mark.parametrize("device", cpu_and_cuda())``.
    """
    return ("cpu", pytest.param("cuda", marks=CUDA_MARKS))


def cuda_kernel_param(name: str = "device"):
    """A parameter value ``name`` that runs only with a CUDA device and the CUDA build
    (the real kernels, next to their emulated twin in the kernel tests)."""
    return pytest.param(
        name,
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and ssd_post.ops.has_cuda_kernels()),
                reason="needs a CUDA device and the CUDA build",
            ),
        ],
    )


def random_boxes(n: int, generator: torch.Generator, size: float = 100.0) -> torch.Tensor:
    """n valid xyxy boxes inside [0, size]^2 (Tensor[n, 4])."""
    xy = torch.rand(n, 2, generator=generator) * size * 0.8
    wh = torch.rand(n, 2, generator=generator) * size * 0.3 + 1.0
    return torch.cat((xy, xy + wh), dim=1)


def assert_same_detections(
    actual: ssd_post.Detections, expected: ssd_post.Detections, box_atol: float = 0.0
) -> None:
    """Counts, labels, scores and (by default) boxes to the bit; anchor indices
    exactly where both sides have them."""
    torch.testing.assert_close(actual.num_detections, expected.num_detections, rtol=0, atol=0)
    torch.testing.assert_close(actual.labels, expected.labels, rtol=0, atol=0)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=0)
    torch.testing.assert_close(actual.boxes, expected.boxes, rtol=0, atol=box_atol)
    if actual.anchor_indices is not None and expected.anchor_indices is not None:
        torch.testing.assert_close(actual.anchor_indices, expected.anchor_indices, rtol=0, atol=0)


def assert_same_detections_up_to_ties(
    actual: ssd_post.Detections, expected: ssd_post.Detections
) -> None:
    """Counts and ranked scores to the bit; inside each run of exactly equal scores
    the (label, box) rows as a multiset, since torchvision leaves the order of
    exact ties unspecified (topk, unstable sort) while ssd_post fixes it."""
    torch.testing.assert_close(actual.num_detections, expected.num_detections, rtol=0, atol=0)
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=0)

    def rows(det, image):
        n = int(det.num_detections[image])
        return sorted(
            zip(
                (-s for s in det.scores[image, :n].tolist()),
                det.labels[image, :n].tolist(),
                map(tuple, det.boxes[image, :n].tolist()),
            )
        )

    for image in range(actual.num_detections.shape[0]):
        assert rows(actual, image) == rows(expected, image), f"image {image} differs beyond ties"


def draw_class_major_scores(data, batch: int, classes: int, anchors: int) -> torch.Tensor:
    """Hypothesis scores [batch, classes, anchors] on a grid of 1/8 (exact ties between
    classes and anchors), with one NaN, inf or -inf half of the time. ``data`` is
    hypothesis' ``st.data()``."""
    from hypothesis import strategies as st

    n = batch * classes * anchors
    grid = st.integers(0, 8).map(lambda k: k / 8.0)
    values = data.draw(st.lists(grid, min_size=n, max_size=n))
    scores = torch.tensor(values, dtype=torch.float32).reshape(batch, classes, anchors)
    if n and data.draw(st.booleans()):
        special = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        scores.view(-1)[data.draw(st.integers(0, n - 1))] = special
    return scores


def onnx_value_dims(value_info) -> list:
    """The dims of an ONNX value: ints where fixed, names where symbolic."""
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in value_info.type.tensor_type.shape.dim
    ]


def onnx_inferred_shapes(path: str):
    """The exporter's declared output dims of the .onnx file at ``path``, then ONNX
    shape inference's with those declarations erased (what the graph itself
    computes). Returns (declared {name: dims}, inferred graph outputs, input 0's dims)."""
    import onnx

    model = onnx.load(path)
    declared = {o.name: onnx_value_dims(o) for o in model.graph.output}
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    return declared, list(inferred.graph.output), onnx_value_dims(inferred.graph.input[0])
