"""The tiny RetinaNet (``tiny_retinanet``): a per-level head on the tiny trunk, its
focal loss, its per-level postprocess inputs, and the shipped checkpoint."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from common_utils import assert_same_detections
from models import build_model, check_model_options
from models.checkpoint import load_detector, read_checkpoint, save_detector
from models.tiny import TinyBackbone, TinyTrunk
from ssd_post import exportable
from training.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train.py is a script at the repository root, not a package module.
if REPO not in sys.path:
    sys.path.insert(0, REPO)
ARCH = "tiny_retinanet"
CHECKPOINT = os.path.join(REPO, "checkpoints", "tiny_shapes_retinanet.pt")
CONFIG = os.path.join(REPO, "configs", "tiny_shapes_retinanet.yaml")
LOSS_OPTIONS = {"iou_thresh": 0.5, "bg_iou_thresh": 0.4}
# Cells of the three levels (strides 8, 16, 32) at 128x128, 9 anchors per cell.
LEVEL_SIZES_128 = [16 * 16 * 9, 8 * 8 * 9, 4 * 4 * 9]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ARCH, 5, width=8).eval()


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[60.0, 50.0, 110.0, 96.0], [5.0, 80.0, 20.0, 95.0]]),
            "labels": torch.tensor([4, 2]),
        },
    ]


def test_forward_gives_one_row_per_anchor_of_three_levels(model):
    locs, logits = model(torch.randn(2, 3, 128, 128))
    anchors = model.anchors()
    assert anchors.shape == (sum(LEVEL_SIZES_128), 4)
    assert locs.shape == (2, anchors.shape[0], 4) and logits.shape == (2, anchors.shape[0], 5)
    assert model.postprocess_inputs() == {"level_sizes": LEVEL_SIZES_128}
    # A 96x160 input changes every grid: the level sizes follow the feature maps.
    wide = build_model(ARCH, 5, width=8, image_size=(96, 160))
    assert wide.postprocess_inputs()["level_sizes"] == [12 * 20 * 9, 6 * 10 * 9, 3 * 5 * 9]


def test_postprocess_is_sigmoid_per_level_with_the_heads_box_coder(model):
    config = model.postprocess_config
    assert (config.score_activation, config.selection) == ("sigmoid", "per_level")
    assert config.background_class is None
    assert config.box_weights == tuple(model.head.regression_head.box_coder.weights)


def test_focal_loss_is_finite_and_reaches_every_part():
    torch.manual_seed(0)
    model = build_model(ARCH, 5, width=8).train()
    losses = model.compute_loss(torch.randn(2, 3, 128, 128), _targets(), LOSS_OPTIONS)
    assert set(losses) == {"bbox", "cls", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["cls"] + losses["bbox"])
    losses["loss"].backward()
    for part in (
        model.backbone.body.stem,
        model.backbone.fpn,
        model.head.classification_head,
        model.head.regression_head,
    ):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0


def test_label_k_trains_logit_column_k_and_column_0_is_never_a_positive():
    # As torchvision's RetinaNet: the one-hot target of label k is column k, so the
    # loss of a label-3 box pushes column 3 up at the anchors matched to it and
    # column 0 (a negative everywhere) down.
    from torchvision.models.detection import _utils as det_utils
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    model = build_model(ARCH, 5, width=8).train()
    target = [{"boxes": torch.tensor([[40.0, 40.0, 70.0, 72.0]]), "labels": torch.tensor([3])}]
    seen = []

    def keep_logits(module, inputs, output):
        output["cls_logits"].retain_grad()
        seen.append(output["cls_logits"])

    hook = model.head.register_forward_hook(keep_logits)
    try:
        model.compute_loss(torch.randn(1, 3, 128, 128), target, LOSS_OPTIONS)["cls"].backward()
    finally:
        hook.remove()
    matched = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)(
        box_iou(target[0]["boxes"], model.anchors())
    )
    positives = torch.nonzero(matched >= 0).flatten()
    grad = seen[0].grad[0]  # [A, C]; descent moves a logit against its gradient
    assert positives.numel() > 0
    assert bool((grad[positives, 3] < 0).all())
    others = [c for c in range(5) if c != 3]
    assert bool((grad[positives][:, others] > 0).all())
    # Anchors between the two IoU thresholds are ignored (Matcher.BETWEEN_THRESHOLDS).
    counted = matched != det_utils.Matcher.BETWEEN_THRESHOLDS
    assert bool((grad[counted, 0] > 0).all()) and bool((grad[~counted] == 0).all())


def test_exported_module_gives_predicts_detections(model):
    # What the AOTInductor packages compile: the detector and the per-level
    # postprocess with the level sizes baked in.
    torch.manual_seed(1)
    low = build_model(ARCH, 5, width=8, postprocess={"score_thresh": 0.005}).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        outputs = exportable.DetectorModule(low)(images)
    want = low.predict(images)
    assert int(want.num_detections.min()) > 0, "the test needs detections to compare"
    assert_same_detections(exportable.detections_from_outputs(outputs), want)


def test_width_and_size_options_are_checked():
    check_model_options(ARCH, 5, width=16, image_size=[128, 96])
    with pytest.raises(ValueError, match="width should be an even int >= 4, got 5"):
        check_model_options(ARCH, 5, width=5)
    with pytest.raises(ValueError, match="both >= 64"):
        check_model_options(ARCH, 5, image_size=[32, 128])


def test_checkpoint_round_trip(model, tmp_path):
    path = str(tmp_path / "tiny_retinanet.pt")
    save_detector(model, path)
    loaded = load_detector(path, expected={"arch": ARCH, "num_classes": 5}).eval()
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for a, b in zip(model(images), loaded(images)):
            assert torch.equal(a, b)
    assert loaded.model_config() == model.model_config()


def test_tiny_trunk_split_keeps_the_tiny_ssd_state_dict_keys():
    # checkpoints/tiny_shapes.pt was saved before the trunk was shared: its keys
    # are the trunk's stages at the top level of the backbone plus the top-down path.
    keys = set(TinyBackbone(8).state_dict())
    trunk = set(TinyTrunk(8).state_dict())
    assert trunk < keys
    assert {k.split(".")[0] for k in keys - trunk} == {
        "lateral16",
        "smooth8",
        "lateral8",
        "smooth4",
    }


def test_shipped_config_trains_and_validates_through_train_py(tmp_path):
    # One train and one val batch of the shipped config on a few generated images:
    # the focal loss under Lightning, and validation through the per-level
    # postprocess and the data set's label -> category mapping.
    import train

    overrides = {
        "data.root": str(tmp_path / "shapes"),
        "data.num_train": 8,
        "data.num_val": 4,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "trainer.enable_progress_bar": False,
    }
    args = ["--config", CONFIG, "--fast-dev-run", "--output-dir", str(tmp_path / "out")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert train.main(args) == 0


@pytest.mark.skipif(not os.path.isfile(CHECKPOINT), reason="not trained yet")
def test_shipped_checkpoint_loads_weights_only_and_is_per_level():
    raw = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert set(raw) == {"model_config", "state_dict"}
    assert os.path.getsize(CHECKPOINT) < 4 * 2**20
    assert read_checkpoint(CHECKPOINT)["model_config"]["arch"] == ARCH
    detector = load_detector(CHECKPOINT, expected={"arch": ARCH, "num_classes": 5}).eval()
    config = detector.postprocess_config
    assert (config.score_activation, config.selection, config.background_class) == (
        "sigmoid",
        "per_level",
        None,
    )
    assert detector.postprocess_inputs() == {"level_sizes": LEVEL_SIZES_128}
    # The config it was trained with describes the same model.
    trained = load_config(CONFIG).model
    stored = detector.model_config()
    assert (trained.arch, trained.num_classes, trained.width) == (ARCH, 5, stored["width"])
    assert trained.image_size == stored["image_size"]
    for name, value in trained.postprocess.items():
        assert getattr(config, name) == value, name
