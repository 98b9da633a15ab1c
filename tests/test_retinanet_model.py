"""models' RetinaNet: torchvision's network, anchors and loss, ssd_post's per-level
postprocess; end to end equal to torchvision's own RetinaNet in eval mode."""

from __future__ import annotations

import os

import pytest
import torch
from torchvision.models import detection

import ssd_post
from common_utils import assert_same_detections, assert_same_detections_up_to_ties
from models import build_model, check_model_options
from ssd_post import reference
from training.config import ConfigError, config_from_dict, load_config
from models.detector import get_postprocess
from training.evaluation import StageTimer, infer_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 256
ARCH = "retinanet_resnet50_fpn"
# Mean of the class logits: about 0.5% of the (anchor, class) pairs pass 0.05.
LOGIT_SHIFT = -6.8


@pytest.fixture(scope="module")
def pair():
    """torchvision's RetinaNet (input kept at SIZE: min_size = max_size = SIZE, so its
    transform only normalises) and ours with the same weights, classification logits
    spread (std about 1.5) and shifted so that a few thousand pairs pass 0.05.

    Few enough that no two candidates of one class tie: with most of the 1.1 M pairs
    above the threshold, float32 sigmoid scores tie by the dozen, and torchvision
    breaks ties in its top-k and NMS sorts in an unspecified order (its answer
    then depends on the CPU's sort kernel), while ssd_post takes the lower index."""
    torch.manual_seed(0)
    theirs = detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=SIZE, max_size=SIZE
    ).eval()
    ours = build_model(ARCH, 91, image_size=(SIZE, SIZE)).eval()
    last_conv = theirs.head.classification_head.cls_logits
    with torch.no_grad():
        last_conv.bias.zero_()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        spread = ours(_normalise(_images(1, seed=0), ours))[1].std().item()
        last_conv.weight.mul_(1.5 / spread)  # logits std about 1.5: no sigmoid saturates to 1.0
        last_conv.bias.fill_(LOGIT_SHIFT)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def _images(batch: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, SIZE, SIZE, generator=generator)


def _normalise(images, model):
    mean = torch.tensor(model.image_mean)[:, None, None]
    std = torch.tensor(model.image_std)[:, None, None]
    return (images - mean) / std


def test_anchors_and_level_sizes_are_torchvisions(pair):
    theirs, ours = pair
    images = _images(1)
    with torch.no_grad():
        image_list, _ = theirs.transform(list(images))
        features = list(theirs.backbone(image_list.tensors).values())
        expected = theirs.anchor_generator(image_list, features)[0]
    assert torch.equal(ours.anchors(), expected)
    level_sizes = ours.postprocess_inputs()["level_sizes"]
    assert level_sizes == [f.shape[-2] * f.shape[-1] * 9 for f in features]
    assert sum(level_sizes) == expected.shape[0]
    assert ours.postprocess_config == ssd_post.PostprocessConfig.from_torchvision(theirs)


@pytest.mark.slow  # ResNet-50 FPN forward passes
@pytest.mark.parametrize("batch,topk", [(1, 1000), (3, 1000), (2, 20)])
def test_predict_equals_torchvisions_retinanet(pair, batch, topk, monkeypatch):
    # topk 20: every level sends only its best 20 to NMS, so level sizes matter.
    theirs, ours = pair
    monkeypatch.setattr(theirs, "topk_candidates", topk)
    monkeypatch.setattr(
        ours, "postprocess_config", ssd_post.PostprocessConfig.from_torchvision(theirs)
    )
    images = _images(batch)
    with torch.no_grad():
        expected = ssd_post.Detections.from_list(
            theirs(list(images)), ours.postprocess_config.detections_per_img
        )
        got = ours.predict(_normalise(images, ours))
        loop = ours.predict(_normalise(images, ours), postprocess="torchvision")
    assert int(got.num_detections.min()) > 20, "the test needs detections to compare"
    assert int(got.num_detections.max()) <= 5 * topk
    assert_same_detections_up_to_ties(got, expected)
    assert_same_detections_up_to_ties(loop, expected)


@pytest.mark.slow  # ResNet-50 FPN forward passes
def test_loss_equals_torchvisions(pair):
    theirs, ours = pair
    images = _images(2, seed=4)
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 120.0, 140.0], [150.0, 30.0, 250.0, 90.0]]),
            "labels": torch.tensor([3, 17]),
        },
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    # Eval mode for both: BatchNorm then uses its running statistics, which one
    # training-mode pass of each model would update differently.
    with torch.no_grad():
        theirs.training = True  # only RetinaNet.forward's switch; the submodules stay in eval
        try:
            expected = theirs(list(images), targets)
        finally:
            theirs.training = False
        got = ours.compute_loss(
            _normalise(images, ours), targets, {"iou_thresh": 0.5, "bg_iou_thresh": 0.4}
        )
    torch.testing.assert_close(got["cls"], expected["classification"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got["bbox"], expected["bbox_regression"], rtol=1e-6, atol=0)
    torch.testing.assert_close(got["loss"], got["cls"] + got["bbox"])


@pytest.mark.slow  # ResNet-50 FPN forward passes
def test_loss_trains_the_head():
    torch.manual_seed(0)
    model = build_model(ARCH, 4, image_size=(128, 128)).train()
    images = torch.randn(2, 3, 128, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[40.0, 30.0, 120.0, 100.0]]), "labels": torch.tensor([2])},
    ]
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.01)
    losses = []
    for _ in range(4):
        loss = model.compute_loss(images, targets, {"iou_thresh": 0.5, "bg_iou_thresh": 0.4})[
            "loss"
        ]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.slow  # ResNet-50 FPN forward passes
def test_infer_batch_passes_level_sizes(pair):
    _, ours = pair
    images = _normalise(_images(2, seed=5), ours)
    targets = [
        {"image_id": 1, "orig_size": (SIZE, SIZE)},
        {"image_id": 2, "orig_size": (SIZE, SIZE)},
    ]
    with torch.no_grad():
        per_image = infer_batch(
            ours, images, targets, ours.anchors(), get_postprocess("ssd_post"), StageTimer()
        )
        expected = ours.predict(images)
    assert [len(per_image[i]) for i in (1, 2)] == expected.num_detections.tolist()


def test_the_export_module_of_the_per_level_detector_equals_predict():
    # Both exporters trace exactly this module (tests/test_aoti_family.py,
    # tests/test_onnx_family.py).
    from ssd_post import exportable

    ours = build_model(ARCH, 4, image_size=(64, 64)).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = exportable.DetectorModule(ours)(images)
    want = ours.predict(images)
    assert_same_detections(exportable.detections_from_outputs(outputs), want)


@pytest.mark.parametrize(
    "size,match",
    [
        ((800, 800), None),
        ((640, 1344), None),
        ((64, 96), None),
        ((800, 1333), "multiples of 32"),
        ((32, 128), ">= 64"),
    ],
)
def test_image_size_rule(size, match):
    if match is None:
        check_model_options(ARCH, 91, image_size=list(size))
    else:
        with pytest.raises(ValueError, match=match):
            check_model_options(ARCH, 91, image_size=list(size))


def test_shipped_config_follows_torchvisions_recipe():
    config = load_config(os.path.join(REPO, "configs", "retinanet_coco.yaml"))
    assert (config.model.arch, config.model.num_classes, config.model.image_size) == (
        ARCH,
        91,
        [800, 800],
    )
    assert (config.optim.lr, config.optim.weight_decay, config.trainer.max_epochs) == (
        0.01,
        1e-4,
        26,
    )
    assert (config.loss.iou_thresh, config.loss.bg_iou_thresh) == (0.5, 0.4)
    assert config.data.augment.crop_p == 0.0 and config.data.augment.flip_p == 0.5


def test_background_iou_above_foreground_is_refused_in_one_line():
    raw = {
        "model": {"arch": ARCH, "num_classes": 91},
        "loss": {"iou_thresh": 0.5, "bg_iou_thresh": 0.6},
    }
    with pytest.raises(
        ConfigError,
        match=r"^loss.bg_iou_thresh: 0.6; allowed: a number <= loss.iou_thresh \(0.5\)$",
    ):
        config_from_dict(raw)


def test_reference_refuses_what_torchvision_has_no_loop_for():
    config = ssd_post.PostprocessConfig(
        score_activation="softmax", background_class=0, selection="per_level"
    )
    with pytest.raises(ValueError, match="no background column"):
        reference.torchvision_postprocess(
            torch.zeros(1, 4, 4),
            torch.zeros(1, 4, 3),
            torch.zeros(4, 4),
            [(8, 8)],
            config,
            level_sizes=[4],
        )
