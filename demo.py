"""Short tour of the API on real torchvision SSD300 outputs (random weights):
the detections of ssd_post and of torchvision's per-image loop, and their times.

    python demo.py [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.models.detection import ssd300_vgg16

import ssd_post
from ssd_post import PostprocessConfig, reference


def _best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error(f"--batch-size should be >= 1, got {args.batch_size}")

    torch.manual_seed(0)
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91).eval()
    with torch.no_grad():
        # A random head saturates many softmax scores at the same float just below 1;
        # torchvision leaves the order of exactly equal scores to torch.topk (ssd_post
        # orders them by anchor), so shrink the logits to a trained model's spread.
        for conv in model.head.classification_head.module_list:
            conv.weight.mul_(0.5)
            conv.bias.mul_(0.5)
    images = torch.rand(args.batch_size, 3, 300, 300)
    with torch.no_grad():
        image_list, _ = model.transform(list(images))
        features = list(model.backbone(image_list.tensors).values())
        head = model.head(features)  # bbox_regression [B, 8732, 4], cls_logits [B, 8732, 91]
        anchors = model.anchor_generator(image_list, features)  # B x [8732, 4]
    config = PostprocessConfig.from_torchvision(model)
    locs, logits, sizes = head["bbox_regression"], head["cls_logits"], image_list.image_sizes

    detections = ssd_post.postprocess(locs, logits, anchors, sizes, config)
    first = detections.to_list()[0]
    print(f"batch {args.batch_size}: detections per image {detections.num_detections.tolist()}")
    print("image 0, best three:")
    for box, score, label in zip(
        first["boxes"][:3].tolist(), first["scores"][:3].tolist(), first["labels"][:3].tolist()
    ):
        print(f"  label {label:2d}  score {score:.4f}  box {[round(v, 1) for v in box]}")

    expected = model.postprocess_detections(head, anchors, sizes)
    same = all(
        torch.equal(got["labels"], want["labels"])
        and torch.equal(got["scores"], want["scores"])
        and torch.allclose(got["boxes"], want["boxes"], atol=1e-3)
        for got, want in zip(detections.to_list(), expected)
    )
    print(f"same detections as torchvision's SSD.postprocess_detections: {same}")

    fast = _best_of(lambda: ssd_post.postprocess(locs, logits, anchors, sizes, config))
    loop = _best_of(lambda: reference.torchvision_postprocess(locs, logits, anchors, sizes, config))
    print(
        f"postprocess time: ssd_post {fast * 1e3:.1f} ms, torchvision loop {loop * 1e3:.1f} ms "
        f"({loop / fast:.1f}x) for {args.batch_size} images on {torch.get_num_threads()} threads"
    )
    if not same:
        raise SystemExit("detections differ from torchvision's")


if __name__ == "__main__":
    main()
