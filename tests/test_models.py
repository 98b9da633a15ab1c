"""Models: torchvision state_dict compatibility, ssd_post inference, loss, checkpoints."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torchvision.models import detection

import ssd_post
import models
from models import build_model, check_model_options
from models.checkpoint import load_detector, save_detector
from models.detector import POSTPROCESSORS
from models.multibox import match_anchors, multibox_loss, pad_targets
from ssd_post import BoxCoder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny", 5, width=8).eval()


def test_former_detector_name_is_an_alias():
    detector = build_model("tiny", 5)
    assert models.SSDDetector is models.SingleStageDetector
    assert isinstance(detector, models.SSDDetector)


def test_unknown_arch_is_named():
    with pytest.raises(ValueError, match="resnet_ssd"):
        build_model("resnet_ssd", 5)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="depth"):
        build_model("tiny", 5, depth=3)


@pytest.mark.parametrize(
    "arch, options, message",
    [
        ("tiny", {"width": None}, "width should be an even int >= 4, got None"),
        ("tiny", {"width": 7}, "width should be an even int >= 4, got 7"),
        ("tiny", {"image_size": [32, 32]}, "both >= 64"),
        ("tiny", {"image_size": "128"}, "image_size should be (h, w), two ints"),
        ("tiny", {"image_mean": [0.5, None, 0.5]}, "image_mean should be three numbers"),
        ("tiny", {"postprocess": {"nms": 0.5}}, "unknown postprocess option(s) ['nms']"),
        ("tiny", {"postprocess": {"score_thresh": 2.0}}, "score_thresh"),
        ("ssd300_vgg16", {"width": 8}, "unknown option(s) for arch 'ssd300_vgg16': ['width']"),
        ("ssd300_vgg16", {"image_size": [320, 320]}, "fixed input size (300, 300)"),
    ],
)
def test_bad_model_options_are_named_before_anything_is_built(arch, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_model_options(arch, 5, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model(arch, 5, **options)


def test_checkpoint_with_a_tampered_config_names_the_field(tiny, tmp_path):
    path = str(tmp_path / "tiny.pt")
    save_detector(tiny, path)
    data = torch.load(path, weights_only=True)
    data["model_config"]["width"] = None
    torch.save(data, path)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: model_config is invalid: width should be")
    ):
        load_detector(path)


def test_tiny_shapes_and_anchor_count(tiny):
    images = torch.randn(2, 3, 128, 128)
    locs, logits = tiny(images)
    anchors = tiny.anchors()
    assert anchors.dtype == torch.float32 and anchors.shape[1] == 4
    assert locs.shape == (2, anchors.shape[0], 4)
    assert logits.shape == (2, anchors.shape[0], 5)
    assert tiny.anchors() is anchors  # cached
    assert 1e5 < sum(p.numel() for p in build_model("tiny", 5).parameters()) < 5e6


def test_wrong_input_size_is_rejected(tiny):
    with pytest.raises(ValueError, match=r"\(128, 128\)"):
        tiny(torch.randn(1, 3, 96, 96))


def test_predict_ssd_post_equals_torchvision_loop():
    torch.manual_seed(1)
    # The untrained head starts at P(foreground) = 0.01: a low threshold keeps candidates.
    tiny = build_model("tiny", 5, width=8, postprocess={"score_thresh": 0.002}).eval()
    images = torch.randn(3, 3, 128, 128)
    ours = tiny.predict(images)
    theirs = tiny.predict(images, postprocess="torchvision")
    assert ours.num_detections.tolist() == theirs.num_detections.tolist()
    assert int(ours.num_detections.sum()) > 0
    assert torch.equal(ours.labels, theirs.labels)
    torch.testing.assert_close(ours.boxes, theirs.boxes)
    torch.testing.assert_close(ours.scores, theirs.scores)
    assert float(ours.boxes.max()) <= 128.0
    with pytest.raises(ValueError, match="postprocess"):
        tiny.predict(images, postprocess="loop")


def test_predict_calls_ssd_post(tiny, monkeypatch):
    assert POSTPROCESSORS["ssd_post"] is ssd_post.postprocess
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return ssd_post.postprocess(*args, **kwargs)

    monkeypatch.setitem(POSTPROCESSORS, "ssd_post", counted)
    tiny.predict(torch.randn(1, 3, 128, 128))
    assert calls == [1]


@pytest.mark.slow  # builds full-size torchvision models: about 15 s each on 2 shared cores
@pytest.mark.parametrize(
    "arch,builder,size",
    [
        ("ssd300_vgg16", detection.ssd300_vgg16, 300),
        ("ssdlite320_mobilenet_v3_large", detection.ssdlite320_mobilenet_v3_large, 320),
    ],
)
def test_torchvision_state_dict_loads_strict_and_matches(arch, builder, size):
    torch.manual_seed(0)
    reference = builder(weights=None, weights_backbone=None, num_classes=91).eval()
    ours = build_model(arch, 91).eval()
    theirs = reference.state_dict()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    ours.load_state_dict(theirs, strict=True)
    images = torch.randn(1, 3, size, size)
    with torch.no_grad():
        locs, logits = ours(images)
        features = list(reference.backbone(images).values())
        head = reference.head(features)
        tv_anchors = reference.anchor_generator(
            detection.image_list.ImageList(images, [(size, size)]), features
        )[0]
    torch.testing.assert_close(locs, head["bbox_regression"])
    torch.testing.assert_close(logits, head["cls_logits"])
    assert torch.equal(ours.anchors(), tv_anchors)
    assert ours.postprocess_config == ssd_post.PostprocessConfig.from_torchvision(reference)


def test_match_anchors_threshold_and_best_anchor():
    anchors = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [100, 100, 140, 140.0]]
    )
    targets = [
        {
            "boxes": torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    boxes, labels, valid = pad_targets(targets, torch.device("cpu"))
    matched = match_anchors(anchors, boxes, valid, 0.5)
    # anchor 0: IoU 1 with box 0; anchor 1: IoU 0.25 -> background; anchor 3 is box 1's
    # best anchor (IoU 1/16) and claims it although below the threshold.
    assert matched.tolist() == [[0, -1, -1, 1], [-1, -1, -1, -1]]


def test_multibox_loss_perfect_prediction_and_hard_negatives():
    coder = BoxCoder()
    anchors = torch.tensor(
        [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70], [80, 80, 90, 90.0]]
    )
    gt = torch.tensor([[1, 1, 11, 11.0]])
    targets = [{"boxes": gt, "labels": torch.tensor([2])}]
    locs = torch.zeros(1, 5, 4)
    locs[0, 0] = coder.encode(gt, anchors[:1])[0]
    logits = torch.full((1, 5, 3), -10.0)
    logits[0, 0, 2] = 10.0
    logits[0, 1:, 0] = 10.0
    good = multibox_loss(locs, logits, anchors, targets, coder)
    assert good["num_pos"] == 1 and good["bbox"] < 1e-6 and good["cls"] < 1e-3
    # One confidently wrong negative enters the loss through hard negative mining.
    logits[0, 4, 0], logits[0, 4, 1] = -10.0, 10.0
    bad = multibox_loss(locs, logits, anchors, targets, coder)
    assert bad["cls"] > 19.0
    # Many wrong negatives: only 3 (per positive) are counted.
    logits[0, 1:, 0], logits[0, 1:, 1] = -10.0, 10.0
    capped = multibox_loss(locs, logits, anchors, targets, coder)
    assert 3 * 19.0 < capped["cls"] < 3 * 21.0


def test_multibox_loss_trains_gradient_flows(tiny):
    model = build_model("tiny", 5, width=8).train()
    images = torch.randn(2, 3, 128, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    locs, logits = model(images)
    loss = multibox_loss(locs, logits, model.anchors(), targets, BoxCoder())["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert sum(float(p.grad.abs().sum()) for p in model.head.regression_head.parameters()) > 0
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.stem.parameters()) > 0


def test_checkpoint_round_trip(tiny, tmp_path):
    path = str(tmp_path / "tiny.pt")
    save_detector(tiny, path)
    raw = torch.load(path, weights_only=True)
    assert raw["model_config"]["arch"] == "tiny" and raw["model_config"]["num_classes"] == 5
    loaded = load_detector(path, expected={"arch": "tiny", "num_classes": 5}).eval()
    images = torch.randn(1, 3, 128, 128)
    for a, b in zip(tiny(images), loaded(images)):
        torch.testing.assert_close(a, b)
    assert loaded.model_config() == tiny.model_config()


def test_checkpoint_mismatch_is_named(tiny, tmp_path):
    path = str(tmp_path / "tiny.pt")
    save_detector(tiny, path)
    with pytest.raises(ValueError, match="num_classes mismatch: checkpoint has 5, expected 91"):
        load_detector(path, expected={"num_classes": 91})
    with pytest.raises(ValueError, match="arch mismatch"):
        load_detector(path, expected={"arch": "ssd300_vgg16"})


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_refuses_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    torch.save({"model_config": {"arch": "tiny"}, "state_dict": {}, "payload": _RunsCode()}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_detector(path)
    with open(tmp_path / "junk.pt", "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_detector(str(tmp_path / "junk.pt"))
