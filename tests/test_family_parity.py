"""ssd_post.postprocess equals torchvision's RetinaNet / FCOS postprocess_detections
to the bit, on real forward outputs of the models (random weights, small images)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn_v2

import ssd_post
from common_utils import assert_same_detections_up_to_ties, needs_cuda
from ssd_post import PostprocessConfig, reference


BUILDERS = {
    "retinanet_resnet50_fpn_v2": retinanet_resnet50_fpn_v2,
    "fcos_resnet50_fpn": fcos_resnet50_fpn,
}
# Mixed sizes and aspect ratios: each image is clipped to its own (h, w) inside the
# padded batch.
IMAGE_SIZES = [(256, 256), (160, 320), (320, 200), (240, 240)]


def _forward_to_postprocess(model, images):
    """What RetinaNet/FCOS.forward hands to postprocess_detections: head outputs and
    anchors split by level, and the image sizes."""
    image_list, _ = model.transform(images)
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)
    level_sizes = [f.shape[2] * f.shape[3] for f in features]
    level_sizes = [n * (anchors[0].shape[0] // sum(level_sizes)) for n in level_sizes]
    split = {k: list(v.split(level_sizes, dim=1)) for k, v in head_outputs.items()}
    return split, [list(a.split(level_sizes)) for a in anchors], image_list.image_sizes


def _spread_class_logits(model, target_std: float) -> None:
    """Scales the final classification conv so that the logits spread over about
    ``target_std``: few exactly tied scores (torchvision's tie order is unspecified)
    and a fair number of scores above the thresholds."""
    last_conv = model.head.classification_head.cls_logits
    probe = [torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0))]
    std = torch.cat(_forward_to_postprocess(model, probe)[0]["cls_logits"], dim=1).std().item()
    last_conv.weight.mul_(target_std / std)
    last_conv.bias.zero_()


# ResNet-50 FPN models, built and run at full size: the slow tier.
@pytest.fixture(
    scope="module", params=[pytest.param(name, marks=pytest.mark.slow) for name in sorted(BUILDERS)]
)
def model_outputs(request):
    torch.manual_seed(0)
    model = BUILDERS[request.param](
        weights=None, weights_backbone=None, num_classes=91, min_size=256, max_size=320
    ).eval()
    with torch.no_grad():
        _spread_class_logits(model, target_std=1.5)
        generator = torch.Generator().manual_seed(1)
        images = [torch.rand(3, h, w, generator=generator) for h, w in IMAGE_SIZES]
        outputs = _forward_to_postprocess(model, images)
    return model, outputs


def _batch(outputs, batch):
    head, anchors, sizes = outputs
    return (
        {k: [level[:batch] for level in v] for k, v in head.items()},
        anchors[:batch],
        sizes[:batch],
    )


def _run_concatenated(postprocess, head, anchors, sizes, config):
    """``postprocess`` (ssd_post's or the oracle) on the head outputs torchvision
    splits by level, concatenated back, with the level sizes."""
    centerness = torch.cat(head["bbox_ctrness"], dim=1) if "bbox_ctrness" in head else None
    return postprocess(
        torch.cat(head["bbox_regression"], dim=1),
        torch.cat(head["cls_logits"], dim=1),
        [torch.cat(a) for a in anchors],
        sizes,
        config,
        level_sizes=[level.shape[1] for level in head["cls_logits"]],
        centerness=centerness,
    )


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_postprocess_matches_torchvision(model_outputs, batch):
    model, outputs = model_outputs
    head, anchors, sizes = _batch(outputs, batch)
    with torch.no_grad():
        expected = model.postprocess_detections(head, anchors, sizes)
    config = PostprocessConfig.from_torchvision(model)
    assert sum(len(d["scores"]) for d in expected) > 0, "test needs detections"
    actual = _run_concatenated(ssd_post.postprocess, head, anchors, sizes, config)
    assert_same_detections_up_to_ties(
        actual, ssd_post.Detections.from_list(expected, config.detections_per_img)
    )


@pytest.mark.parametrize("score_thresh", [0.3, 0.6])
def test_patched_model_matches_torchvision(model_outputs, score_thresh):
    model, outputs = model_outputs
    head, anchors, sizes = _batch(outputs, 3)
    model.score_thresh = score_thresh
    try:
        expected = type(model).postprocess_detections(model, head, anchors, sizes)
        patched = ssd_post.patch_torchvision(model)
        assert patched is model
        actual = model.postprocess_detections(head, anchors, sizes)
    finally:
        del model.postprocess_detections  # back to the class method
        model.score_thresh = BUILDERS_DEFAULT_THRESH[type(model).__name__]
    assert sum(len(d["scores"]) for d in expected) > 0
    config = PostprocessConfig.from_torchvision(model)
    assert_same_detections_up_to_ties(
        ssd_post.Detections.from_list(actual, 300), ssd_post.Detections.from_list(expected, 300)
    )
    assert config.selection == "per_level"


BUILDERS_DEFAULT_THRESH = {"RetinaNet": 0.05, "FCOS": 0.2}


def test_oracle_matches_torchvision(model_outputs):
    model, outputs = model_outputs
    head, anchors, sizes = _batch(outputs, 2)
    with torch.no_grad():
        expected = model.postprocess_detections(head, anchors, sizes)
    config = PostprocessConfig.from_torchvision(model)
    oracle = _run_concatenated(reference.postprocess_loop, head, anchors, sizes, config)
    assert_same_detections_up_to_ties(
        oracle, ssd_post.Detections.from_list(expected, config.detections_per_img)
    )


def test_config_from_torchvision(model_outputs):
    model, _ = model_outputs
    config = PostprocessConfig.from_torchvision(model)
    assert (
        config.score_thresh,
        config.nms_thresh,
        config.topk_candidates,
        config.detections_per_img,
    ) == (model.score_thresh, model.nms_thresh, model.topk_candidates, model.detections_per_img)
    if type(model).__name__ == "RetinaNet":
        assert (config.score_activation, config.box_coder, config.box_weights) == (
            "sigmoid",
            "box",
            (1.0,) * 4,
        )
    else:
        assert (config.score_activation, config.score_factor_mode, config.box_coder) == (
            "sigmoid",
            "sqrt",
            "linear",
        )
    assert config.background_class is None


def _on(device, head, anchors):
    return (
        {k: [level.to(device) for level in v] for k, v in head.items()},
        [[a.to(device) for a in per_image] for per_image in anchors],
    )


@needs_cuda
def test_cuda_per_level_matches_torchvision_on_cuda(model_outputs):
    model, outputs = model_outputs
    head, anchors, sizes = _batch(outputs, 3)
    head, anchors = _on("cuda", head, anchors)
    with torch.no_grad():
        expected = model.postprocess_detections(head, anchors, sizes)
    config = PostprocessConfig.from_torchvision(model)
    actual = _run_concatenated(ssd_post.postprocess, head, anchors, sizes, config)
    assert actual.boxes.device.type == "cuda"
    assert_same_detections_up_to_ties(
        actual.to("cpu"),
        ssd_post.Detections.from_list(
            [{k: v.cpu() for k, v in d.items()} for d in expected], config.detections_per_img
        ),
    )
