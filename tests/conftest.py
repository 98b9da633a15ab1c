"""Fixtures for the ssd_post tests (plain helpers are in common_utils.py)."""

from __future__ import annotations

import os

import pytest
import torch

import ssd_post
from common_utils import SSD300_GRIDS

# Keep the suite deterministic and light on the 2-core CI machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def ssd300_anchors() -> torch.Tensor:
    return ssd_post.DefaultBoxes.ssd300()((300, 300), SSD300_GRIDS)
