"""SSD default boxes (anchors), equal to torchvision's DefaultBoxGenerator."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class DefaultBoxes:
    """Default boxes of an SSD head, in xyxy pixels of the network input.

    For feature map k the boxes have scales s_k and sqrt(s_k * s_{k+1}) at aspect
    ratio 1 plus (s_k * sqrt(r), s_k / sqrt(r)) and its transpose for every ratio r of
    map k, centred on each cell; the order (cell-major, box-minor) and the float32
    arithmetic equal torchvision's ``DefaultBoxGenerator``, so the boxes are the same
    bits.

    Args:
        aspect_ratios: per feature map, the extra ratios (e.g. ``[[2], [2, 3], ...]``).
        min_ratio, max_ratio: scale range used when ``scales`` is None.
        scales: explicit scales, one per feature map plus one.
        steps: per feature map, its stride in input pixels (None: the map's grid).
        clip: clamp box width/height to [0, 1] of the image before use.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]],
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        scales: Optional[Sequence[float]] = None,
        steps: Optional[Sequence[int]] = None,
        clip: bool = True,
    ) -> None:
        num_maps = len(aspect_ratios)
        if num_maps < 1:
            raise ValueError("aspect_ratios should list at least one feature map")
        if steps is not None and len(steps) != num_maps:
            raise ValueError(f"steps should have {num_maps} entries, got {len(steps)}")
        if scales is None:
            if num_maps > 1:
                span = max_ratio - min_ratio
                scales = [min_ratio + span * k / (num_maps - 1.0) for k in range(num_maps)] + [1.0]
            else:
                scales = [min_ratio, max_ratio]
        if len(scales) != num_maps + 1:
            raise ValueError(f"scales should have {num_maps + 1} entries, got {len(scales)}")
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.scales = [float(s) for s in scales]
        self.steps = None if steps is None else list(steps)
        self.clip = clip
        self._wh_pairs = [self._box_sizes(k) for k in range(num_maps)]

    @classmethod
    def ssd300(cls) -> "DefaultBoxes":
        """The default boxes of torchvision's ``ssd300_vgg16`` (8732 for a 300x300 input)."""
        return cls(
            [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
            scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
            steps=[8, 16, 32, 64, 100, 300],
        )

    @classmethod
    def ssdlite320(cls) -> "DefaultBoxes":
        """The default boxes of ``ssdlite320_mobilenet_v3_large`` (3234 for 320x320)."""
        return cls([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)

    def num_anchors_per_location(self) -> List[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def _box_sizes(self, k: int) -> Tensor:
        s_k = self.scales[k]
        s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])
        sizes = [[s_k, s_k], [s_prime, s_prime]]
        for ratio in self.aspect_ratios[k]:
            root = math.sqrt(ratio)
            sizes += [[s_k * root, s_k / root], [s_k / root, s_k * root]]
        return torch.as_tensor(sizes, dtype=torch.float32)

    def __call__(
        self, image_size: Tuple[int, int], grid_sizes: Sequence[Tuple[int, int]]
    ) -> Tensor:
        """Anchors for one input size.

        Args:
            image_size: (height, width) of the network input.
            grid_sizes: (height, width) of each feature map, in head order.

        Returns:
            Tensor[A, 4] float32 xyxy anchors in input pixels.
        """
        if len(grid_sizes) != len(self._wh_pairs):
            raise ValueError(
                f"grid_sizes should have {len(self._wh_pairs)} feature maps, got {len(grid_sizes)}"
            )
        height, width = int(image_size[0]), int(image_size[1])
        centred = []  # (cx, cy, w, h) relative to the image, per map
        for k, (grid_h, grid_w) in enumerate(grid_sizes):
            grid_h, grid_w = int(grid_h), int(grid_w)
            if self.steps is not None:
                x_cells, y_cells = width / self.steps[k], height / self.steps[k]
            else:
                x_cells, y_cells = grid_w, grid_h
            cx = ((torch.arange(0, grid_w) + 0.5) / x_cells).to(torch.float32)
            cy = ((torch.arange(0, grid_h) + 0.5) / y_cells).to(torch.float32)
            grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
            per_cell = len(self._wh_pairs[k])
            centres = torch.stack(
                (grid_x.reshape(-1), grid_y.reshape(-1)) * per_cell, dim=-1
            ).reshape(-1, 2)
            sizes = self._wh_pairs[k].clamp(min=0, max=1) if self.clip else self._wh_pairs[k]
            centred.append(torch.cat((centres, sizes.repeat(grid_h * grid_w, 1)), dim=1))
        boxes = torch.cat(centred, dim=0)
        scale = torch.tensor([width, height])
        return torch.cat(
            (
                (boxes[:, :2] - 0.5 * boxes[:, 2:]) * scale,
                (boxes[:, :2] + 0.5 * boxes[:, 2:]) * scale,
            ),
            dim=-1,
        )
