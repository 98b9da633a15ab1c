"""The RetinaNet/FCOS benchmark shapes: ssd_post equals torchvision's loop on them."""
from __future__ import annotations

import pytest

from benchmarks import family


def test_anchor_geometry():
    anchors, level_sizes = family.make_anchors("retinanet")
    assert anchors.shape == (120_087, 4) and len(level_sizes) == 5 and sum(level_sizes) == 120_087
    assert family.make_anchors("fcos")[0].shape == (13_343, 4)


@pytest.mark.parametrize("model, scenario", [("retinanet", "sparse"), ("fcos", "sparse"), ("fcos", "dense")])
def test_ssd_post_matches_torchvision_on_benchmark_shapes(model, scenario):
    inp = family.make_inputs(model, scenario, batch=2)
    ours = family.run_ssd_post(inp)
    assert ours.num_detections.sum() > 0
    assert family.same_up_to_ties(ours, family.run_torchvision(inp))
