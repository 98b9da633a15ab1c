"""The deployment peers of the benchmark (OpenVINO's own SSD ops) give torchvision's
detections before they are timed: a peer that drifted would be timed on a different
answer."""

from __future__ import annotations

import pytest

pytest.importorskip("openvino")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from benchmarks import deploy  # noqa: E402
from benchmarks.methods import run_torchvision  # noqa: E402
from benchmarks.parity import compare  # noqa: E402
from benchmarks.scenarios import make_inputs  # noqa: E402


@pytest.mark.slow  # OpenVINO compiles a model per case
@pytest.mark.parametrize("peer", ["openvino_multiclass_nms", "openvino_detection_output"])
@pytest.mark.parametrize(
    "scenario, model, batch",
    [
        # toy sparse: fewer detections than keep_top_k, so DetectionOutput's rows end early
        ("sparse", "toy", 2),
        ("dense", "toy", 3),
        ("sparse", "ssd300", 2),
        ("dense", "ssdlite320", 2),
    ],
)
def test_peer_matches_torchvision(peer, scenario, model, batch):
    inp = make_inputs(scenario, model, batch, seed=batch)
    got = deploy.PEERS[peer][0](inp)
    want = run_torchvision(inp)
    result = compare(got, want)
    assert result.ok, result.message
    assert int(want.num_detections.sum()) > 0


def test_detection_output_refuses_mixed_image_sizes():
    inp = make_inputs("sparse", "toy", 2)
    inp.image_sizes[1] += 8
    with pytest.raises(ValueError, match="one image size"):
        deploy.run_openvino_detection_output(inp)
