"""Config, anchors, box coding and detection formats."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

import ssd_post
from ssd_post import BoxCoder, DefaultBoxes, Detections, PostprocessConfig

from common_utils import SSD300_GRIDS, random_boxes


def _torchvision_anchors(generator: DefaultBoxGenerator, image_size, grids):
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    features = [torch.zeros(1, 1, h, w) for h, w in grids]
    return generator(images, features)[0]


def test_ssd300_default_boxes_equal_torchvision():
    expected = _torchvision_anchors(
        DefaultBoxGenerator(
            [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
            scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
            steps=[8, 16, 32, 64, 100, 300],
        ),
        (300, 300),
        SSD300_GRIDS,
    )
    actual = DefaultBoxes.ssd300()((300, 300), SSD300_GRIDS)
    assert actual.shape == (8732, 4)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_ssdlite320_default_boxes_equal_torchvision():
    grids = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    expected = _torchvision_anchors(
        DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95),
        (320, 320),
        grids,
    )
    actual = DefaultBoxes.ssdlite320()((320, 320), grids)
    assert actual.shape == (3234, 4)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_default_boxes_reject_mismatched_grids():
    with pytest.raises(ValueError, match="grid_sizes should have 6"):
        DefaultBoxes.ssd300()((300, 300), SSD300_GRIDS[:5])
    with pytest.raises(ValueError, match="steps should have"):
        DefaultBoxes([[2], [2]], steps=[8])


def test_box_coder_decode_equals_torchvision(ssd300_anchors):
    rel = torch.randn(8732, 4, generator=torch.Generator().manual_seed(0)) * 2
    expected = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(rel, ssd300_anchors)
    torch.testing.assert_close(
        BoxCoder().decode(rel, ssd300_anchors), expected, rtol=1e-6, atol=1e-4
    )


def test_encode_and_decode_invert_each_other(ssd300_anchors):
    generator = torch.Generator().manual_seed(1)
    boxes = random_boxes(8732, generator, size=300.0)
    coder = BoxCoder()
    torch.testing.assert_close(
        coder.decode(coder.encode(boxes, ssd300_anchors), ssd300_anchors),
        boxes,
        rtol=1e-5,
        atol=1e-3,
    )


def test_box_coder_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weights should be 4"):
        BoxCoder((1.0, 2.0))
    with pytest.raises(ValueError, match=r"rel_codes should have shape \[..., 4\]"):
        BoxCoder().decode(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="boxes should be a floating point"):
        BoxCoder().encode(torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 4))


def test_config_defaults_and_from_torchvision():
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    config = PostprocessConfig()
    assert (
        config.score_thresh,
        config.nms_thresh,
        config.topk_candidates,
        config.detections_per_img,
    ) == (0.01, 0.45, 400, 200)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=5)
    read = PostprocessConfig.from_torchvision(model)
    assert read.score_thresh == model.score_thresh and read.nms_thresh == model.nms_thresh
    assert read.topk_candidates == model.topk_candidates and read.box_weights == tuple(
        model.box_coder.weights
    )
    with pytest.raises(ValueError, match="torchvision SSD"):
        PostprocessConfig.from_torchvision(object())


def test_detections_round_trip_and_list_format():
    dicts = [
        {
            "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([3]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
    ]
    det = Detections.from_list(dicts, detections_per_img=4)
    assert det.boxes.shape == (2, 4, 4) and det.num_detections.tolist() == [1, 0] and len(det) == 2
    back = det.to_list()
    for got, want in zip(back, dicts):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], want[key])


def test_coco_results_are_xywh_with_categories(tmp_path):
    det = Detections.from_list(
        [
            {
                "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
                "scores": torch.tensor([0.75]),
                "labels": torch.tensor([1]),
            }
        ],
        detections_per_img=2,
    )
    results = ssd_post.to_coco_results(
        det, [42], label_to_category={1: 7}, scale_xy=torch.tensor([[2.0, 0.5]])
    )
    assert results == [
        {"image_id": 42, "category_id": 7, "bbox": [20.0, 10.0, 40.0, 20.0], "score": 0.75}
    ]
    path = tmp_path / "results.json"
    ssd_post.write_coco_results(results, str(path))
    assert json.loads(path.read_text()) == results
    with pytest.raises(ValueError, match="image_ids should have one id per image"):
        ssd_post.to_coco_results(det, [1, 2])


@pytest.mark.parametrize(
    "fields",
    [
        dict(selection="per_level", score_activation="sigmoid"),
        dict(selection="per_image"),
        dict(score_activation="none"),
        dict(score_factor_mode="before_threshold"),
        dict(label_mode="single"),
        dict(class_agnostic=True),
        dict(classes=(1, 2)),
        dict(box_coder="none", background_class=None),
        dict(box_coder="linear"),
        dict(score_activation="sigmoid"),
    ],
)
def test_onnx_takes_every_mode(fields):
    from ssd_post.onnx import check_expressible

    check_expressible(ssd_post.PostprocessConfig(**fields), 5)  # no error


def test_onnx_refuses_columns_the_logits_lack():
    from ssd_post.onnx import check_expressible

    with pytest.raises(ValueError, match="background_class should be < C = 5, got 7"):
        check_expressible(ssd_post.PostprocessConfig(background_class=7), 5)
    with pytest.raises(ValueError, match=r"classes should be columns < C = 5, got \[1, 6\]"):
        check_expressible(ssd_post.PostprocessConfig(classes=(1, 6)), 5)
