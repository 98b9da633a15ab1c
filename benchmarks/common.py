"""Helpers the benchmark modules share: where results go, what is recorded about
the machine, the inputs of a case and the decode every decode-first method runs.

A leaf of the package (it imports only scenarios.py and real.py, which import no
other benchmark module), so that run.py / memory.py and methods.py / deploy.py
import it at the top instead of importing each other inside functions.
"""

from __future__ import annotations

import json
import os
import platform
from typing import Dict, List

import torch
from torch import Tensor

from ssd_post.box_coder import BoxCoder

from .real import make_real_inputs
from .scenarios import Inputs, make_inputs

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_inputs(scenario: str, model: str, batch: int) -> Inputs:
    """The inputs of one case: the tiny model's outputs for ``"real"``, else the
    synthetic ``scenario`` at the shapes of ``model`` (seeded by the batch size)."""
    if scenario == "real":
        return make_real_inputs(batch)
    return make_inputs(scenario, model, batch, seed=batch)


def decode_clip(locs: Tensor, anchors: Tensor, image_sizes: Tensor, box_weights) -> Tensor:
    """Boxes [B, A, 4] of locs [B, A, 4] on anchors [A, 4], clipped to image_sizes [B, 2] (h, w)."""
    boxes = BoxCoder(box_weights).decode(locs, anchors)
    hw = image_sizes.to(boxes.dtype)  # [B, 2] (h, w)
    limit = torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=1)[:, None, :]
    return torch.minimum(boxes.clamp(min=0), limit)


def load_average() -> List[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine_info() -> Dict:
    """What a benchmark's numbers depend on besides the code (stored with them)."""
    return {
        "cpu": _cpu_name(),
        # torch's SIMD level (DEFAULT / AVX2 / AVX512): one read of the logits, the
        # baseline of most ratios, runs torch's own kernels at this level.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def bar_plot(
    groups: List[str], series: Dict[str, List[float]], ylabel: str, title: str, path: str
) -> str:
    """Grouped bars on a log scale: one group per entry of ``groups``, one bar per
    series (name -> a value per group). Writes the PNG at ``path``, returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))])
    ax.set_xticklabels(groups)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: str, result: Dict) -> None:
    """Writes one benchmark's result to ``path`` (folders made as needed) and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
