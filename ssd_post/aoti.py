"""AOTInductor packages of a detector with ssd_post's postprocess.

``torch.export`` sees ``ssd_post::postprocess`` as one op (its fake kernel gives the
padded output shapes); AOTInductor compiles the network around it and calls the op
through the dispatcher at run time. The op is not inside the package: whoever loads
it must have the op library registered first, which ``load_package`` does here and
which a C++ program does by loading ``library_path()`` (see examples/aoti_cpp).

    path = ssd_post.aoti.export_package(model, "tiny.pt2", example_images)
    runner = ssd_post.aoti.load_package(path)      # in another process
    boxes, scores, labels, num_detections, anchor_indices = runner(images)

Importing :mod:`ssd_post` does not import this module.
"""

from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._extension import library_path, require_extension
from .config import PostprocessConfig
from .exportable import (
    batch_dynamic_shapes,
    exportable_module,
    detections_from_outputs,
    postprocess_module,
    yolo_postprocess_module,
)
from .formats import Detections

__all__ = [
    "export_module",
    "export_package",
    "export_postprocess_package",
    "export_yolo_package",
    "load_package",
    "load_runner",
    "op_library_path",
]


# Package metadata key: what each input must be. AOTInductor checks its inputs only
# when AOTI_RUNTIME_CHECK_INPUTS=1 is set; without it an image of the wrong size
# runs and returns garbage, so the loaders here (and examples/aoti_cpp) check first.
INPUTS_KEY = "ssd_post.inputs"


def op_library_path() -> str:
    """The compiled op library a C++ program loads (dlopen) before the package."""
    require_extension()
    path = library_path()
    assert path is not None  # require_extension() raised otherwise
    return path


def export_module(
    module: nn.Module, args: Tuple[Tensor, ...], path: str, max_batch: int = 64
) -> str:
    """Any module of tensors in, tensors out (dim 0 of every input the batch, 1 to
    ``max_batch``) as an AOTInductor package at ``path``, its inputs recorded for
    :class:`PackageRunner`'s checks. The two functions below are this with
    ssd_post's exportable modules."""
    require_extension()
    if not str(path).endswith(".pt2"):
        raise ValueError(f"path should end in .pt2 (AOTInductor's package format), got {path!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch should be a positive int, got {max_batch!r}")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    inputs = json.dumps(
        {
            "max_batch": max_batch,
            "inputs": [
                {"dtype": str(a.dtype).replace("torch.", ""), "shape": list(a.shape[1:])}
                for a in args
            ],
        }
    )
    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(
            module, args, dynamic_shapes=batch_dynamic_shapes(module, args, batch)
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return str(
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(path),
                inductor_configs={
                    "aot_inductor.metadata": {INPUTS_KEY: inputs},
                    # torch.export assumes a dynamic dim is >= 2; the batch may be 1, and
                    # AOTI_RUNTIME_CHECK_INPUTS=1 (the C++ example) would refuse it.
                    "aot_inductor.check_lowerbound": False,
                },
            )
        )


def export_package(model: nn.Module, path: str, example_images: Tensor, max_batch: int = 64) -> str:
    """Compiles a detector with its postprocess into an AOTInductor package.

    Args:
        model: an :class:`ssd_post.exportable.ExportableDetector` (the repository's
            SingleStageDetector; any postprocess config: SSD's per-class op or the
            family's per-level / per-image ones), or a torchvision SSD, SSDLite,
            RetinaNet or FCOS in eval mode (:func:`ssd_post.exportable.exportable_module`).
        path: the ``.pt2`` file to write.
        example_images (Tensor[B, 3, H, W]): for an ExportableDetector, resized and
            normalised images at its ``image_size``; for a torchvision detector, images
            in [0, 1] of the one size the package takes (the model's normalisation and
            resize are compiled in, and boxes come back in these images' pixels).
        max_batch: the largest batch the package accepts (the batch is dynamic).

    Returns:
        ``path``. The package maps images [B, 3, H, W] to boxes [B, K, 4] float32,
        scores [B, K], labels [B, K] int64, num_detections [B] int64 and
        anchor_indices [B, K] int64 (-1 in padding rows).
    """
    module = exportable_module(model, example_images)
    return export_module(module, (example_images,), path, max_batch)


def export_postprocess_package(
    anchors: Optional[Tensor],
    config: PostprocessConfig,
    path: str,
    example_locs: Tensor,
    example_logits: Tensor,
    example_image_sizes: Optional[Tensor] = None,
    max_batch: int = 64,
    *,
    level_sizes: Optional[Sequence[int]] = None,
    example_score_factor: Optional[Tensor] = None,
) -> str:
    """The postprocess alone, any config, as an AOTInductor package: anchors [A, 4]
    (None with ``box_coder="none"``) and ``level_sizes`` baked in; the inputs are
    ``exportable.postprocess_input_names``: locs [B, A, 4], logits [B, A, C],
    image_sizes [B, 2] int64 (when the config clips, or SSD's op), score_factor
    [B, A(, 1)] (when an example is given). The outputs equal eager
    :func:`ssd_post.postprocess` bit for bit."""
    module, args = postprocess_module(
        anchors,
        config,
        example_locs,
        example_logits,
        example_image_sizes,
        level_sizes=level_sizes,
        example_score_factor=example_score_factor,
    )
    return export_module(module, args, path, max_batch)


def export_yolo_package(
    path: str, example_prediction: Tensor, max_batch: int = 64, *, nc: int = 0, **nms
) -> str:
    """:func:`ssd_post.non_max_suppression` as an AOTInductor package: prediction
    [B, 4 + nc + nm, N] in, the five padded detection tensors out
    (:class:`ssd_post.exportable.YoloPostprocessModule`, whose arguments ``nms``
    are); ``nc=0``: every column after the box is a class."""
    module = yolo_postprocess_module(example_prediction, nc, **nms)
    return export_module(module, (example_prediction,), path, max_batch)


class PackageRunner:
    """A loaded package: ``runner(*inputs)`` returns the module's outputs as a tuple
    (for a detector or postprocess package: boxes [B, K, 4], scores [B, K], labels
    [B, K], num_detections [B], anchor_indices [B, K], which
    ``ssd_post.exportable.detections_from_outputs`` turns into Detections), each
    input checked first against what the package was compiled for (dtype, every dim
    but the batch, batch range)."""

    def __init__(self, compiled, path: str) -> None:
        metadata = compiled.get_metadata()
        if INPUTS_KEY not in metadata:
            raise ValueError(
                f"{path} was not written by ssd_post.aoti (no {INPUTS_KEY!r} metadata)"
            )
        spec = json.loads(metadata[INPUTS_KEY])
        self._compiled = compiled
        self.max_batch: int = spec["max_batch"]
        self.inputs: List[dict] = spec["inputs"]

    def check(self, *inputs: Tensor) -> None:
        """Raises ValueError naming the first input that the package cannot take."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"the package takes {len(self.inputs)} inputs, got {len(inputs)}")
        for index, (tensor, want) in enumerate(zip(inputs, self.inputs)):
            if not isinstance(tensor, Tensor):
                raise ValueError(f"input {index} should be a Tensor, got {type(tensor).__name__}")
            got = {
                "dtype": str(tensor.dtype).replace("torch.", ""),
                "shape": list(tensor.shape[1:]),
            }
            if tensor.dim() == 0 or got != {"dtype": want["dtype"], "shape": want["shape"]}:
                raise ValueError(
                    f"input {index} should be {want['dtype']} "
                    f"[B, {', '.join(map(str, want['shape']))}], "
                    f"got {got['dtype']} {list(tensor.shape)}"
                )
            if not 1 <= tensor.shape[0] <= self.max_batch:
                raise ValueError(
                    f"input {index}: the batch should be in [1, {self.max_batch}], "
                    f"got {tensor.shape[0]}"
                )

    def __call__(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        self.check(*inputs)
        return tuple(self._compiled(*inputs))


def load_package(path: str, device_index: Optional[int] = None) -> PackageRunner:
    """Loads a package written by this module (the ops registered first)."""
    require_extension()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no AOTInductor package at {path!r}")
    compiled = (
        torch._inductor.aoti_load_package(path)
        if device_index is None
        else torch._inductor.aoti_load_package(path, device_index=device_index)
    )
    return PackageRunner(compiled, path)


def load_runner(path: str, device_index: Optional[int] = None) -> Callable[..., Detections]:
    """:func:`load_package` for a detector or postprocess package (this module's
    ``export_*`` functions): Detections out, as ``ssd_post.onnx.load_runner`` gives
    for an ONNX file (boxes [B, K, 4], scores [B, K], labels [B, K] int64,
    num_detections [B] int64, anchor_indices [B, K] int64)."""
    package = load_package(path, device_index)

    def run(*inputs: Tensor) -> Detections:
        return detections_from_outputs(package(*inputs))

    return run
