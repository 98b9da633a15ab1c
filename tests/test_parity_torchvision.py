"""ssd_post.postprocess equals torchvision's SSD.postprocess_detections on real
forward outputs of torchvision's SSD models (random weights)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large

import ssd_post
from ssd_post import PostprocessConfig, reference

from common_utils import assert_same_detections, assert_same_detections_up_to_ties

BUILDERS = {
    "ssd300_vgg16": ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large,
}


def _head_outputs(model, images):
    """What SSD.forward hands to postprocess_detections: head outputs, anchors, sizes."""
    image_list, _ = model.transform(images)
    features = model.backbone(image_list.tensors)
    features = list(features.values()) if isinstance(features, dict) else [features]
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    return head_outputs, anchors, image_list.image_sizes


def _spread_class_logits(model, target_std: float) -> None:
    """Scales the last conv of every classification head layer so that the logits
    have about ``target_std``: scores then range from background-like to confident
    with few exact ties, as after some training (ssdlite's init gives near-uniform
    scores, where torchvision's own order of tied scores is unspecified)."""
    probe = [torch.rand(3, 300, 300, generator=torch.Generator().manual_seed(0))]
    std = _head_outputs(model, probe)[0]["cls_logits"].std().item()
    for layer in model.head.classification_head.module_list:
        last_conv = [m for m in layer.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last_conv.weight.mul_(target_std / std)
        if last_conv.bias is not None:
            last_conv.bias.mul_(target_std / std)


# SSD300-VGG16 is a full-size model (about 30 s to build and run here): the slow tier.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param(name, marks=pytest.mark.slow) if name == "ssd300_vgg16" else name
        for name in sorted(BUILDERS)
    ],
)
def model_outputs(request):
    torch.manual_seed(0)
    model = BUILDERS[request.param](weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        _spread_class_logits(model, target_std=3.0)
    generator = torch.Generator().manual_seed(1)
    # Images of different sizes: the transform resizes them, the anchors follow.
    sizes = [
        (300, 300),
        (240, 320),
        (320, 200),
        (300, 300),
        (280, 260),
        (300, 400),
        (200, 200),
        (350, 300),
    ]
    images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    with torch.no_grad():
        outputs = _head_outputs(model, images)
    return model, outputs


@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("score_thresh", [0.01, 0.2])
def test_postprocess_matches_torchvision(model_outputs, batch, score_thresh):
    model, (head_outputs, anchors, image_sizes) = model_outputs
    model.score_thresh = score_thresh
    head = {k: v[:batch] for k, v in head_outputs.items()}
    expected = model.postprocess_detections(head, anchors[:batch], image_sizes[:batch])
    assert sum(len(d["scores"]) for d in expected) > 0, "test needs detections"
    config = PostprocessConfig.from_torchvision(model)
    actual = ssd_post.postprocess(
        head["bbox_regression"], head["cls_logits"], anchors[:batch], image_sizes[:batch], config
    )
    # Exact ties remain even with spread logits (ssdlite, B=8: two boxes of one class
    # at the same score): compared as sets inside each tie, the rest to the bit.
    assert_same_detections_up_to_ties(
        actual, ssd_post.Detections.from_list(expected, config.detections_per_img)
    )


def test_oracle_matches_torchvision(model_outputs):
    model, (head_outputs, anchors, image_sizes) = model_outputs
    model.score_thresh = 0.05
    head = {k: v[:2] for k, v in head_outputs.items()}
    config = PostprocessConfig.from_torchvision(model)
    expected = reference.torchvision_postprocess(
        head["bbox_regression"], head["cls_logits"], anchors[:2], image_sizes[:2], config
    )
    oracle = reference.postprocess_loop(
        head["bbox_regression"], head["cls_logits"], anchors[:2], image_sizes[:2], config
    )
    assert expected.num_detections.sum() > 0
    assert_same_detections(oracle, expected)


def test_patched_model_gives_the_same_detections(model_outputs):
    model, _ = model_outputs
    model.score_thresh = 0.05
    images = [torch.rand(3, 300, 300, generator=torch.Generator().manual_seed(2)) for _ in range(2)]
    with torch.no_grad():
        expected = model(images)
        patched = ssd_post.patch_torchvision_ssd(model)
        try:
            assert patched is model
            actual = model(images)
        finally:
            del model.postprocess_detections  # back to the class method for other tests
    assert len(actual) == len(expected) == 2
    for got, want in zip(actual, expected):
        assert len(want["scores"]) > 0
        torch.testing.assert_close(got["labels"], want["labels"], rtol=0, atol=0)
        torch.testing.assert_close(got["scores"], want["scores"], rtol=0, atol=0)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=0, atol=1e-3)


def test_patch_rejects_non_ssd():
    with pytest.raises(ValueError, match="torchvision SSD"):
        ssd_post.patch_torchvision_ssd(torch.nn.Linear(2, 2))
