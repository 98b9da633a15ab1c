"""evaluate.py's ``--backend onnxruntime|openvino|aoti``: the network and ssd_post's
postprocess exported to ONNX and run in that runtime, or compiled into AOTInductor
packages (``aoti``: the network as generated C++, the postprocess as ssd_post's op).

Two graphs are exported (the network: images -> locs, logits; the postprocess:
locs, logits, image_sizes -> padded detections) so that evaluate.py can time the
``forward`` and ``postprocess`` stages apart, exactly as for the PyTorch backend.
``ssd_post.onnx.export`` / ``ssd_post.aoti.export_package`` write the single graph
a deployment would use; it is the same two pieces joined.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor, nn

BACKENDS = ("pytorch", "onnxruntime", "openvino", "aoti")
_EXAMPLE_BATCH = 2  # any batch size runs afterwards: the exported batch is dynamic


class _Network(nn.Module):
    """The detector's forward alone, for export."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        return self.detector(images)


class RuntimeDetector:
    """Stands in for the SingleStageDetector in :func:`training.evaluation.run_inference`:
    ``self(images)`` runs the exported network in the runtime; ``anchors()``,
    ``postprocess_config`` and ``image_size`` come from the PyTorch detector."""

    def __init__(
        self, detector: nn.Module, run_network: Callable[[Tensor], Sequence[Tensor]]
    ) -> None:
        self.postprocess_config = detector.postprocess_config
        self.image_size = detector.image_size
        self._anchors = detector.anchors()
        self._run_network = run_network

    def eval(self) -> "RuntimeDetector":
        return self

    def anchors(self) -> Tensor:
        return self._anchors

    def postprocess_inputs(self) -> dict:
        return {}  # a per-level head's level sizes are baked into the exported postprocess

    def __call__(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        locs, logits = self._run_network(images)
        return locs, logits


def build_runtime_backend(detector: nn.Module, backend: str, folder: str, max_batch: int = 64):
    """Exports ``detector`` into ``folder`` and loads both graphs in ``backend``
    (``aoti``: both packages accept batches of 1 to ``max_batch`` images).

    Returns:
        (a detector stand-in, a postprocess function with the signature of
        ``ssd_post.postprocess``; its anchors, config and level sizes are baked into
        the graph).

    Raises:
        ImportError: the runtime or the export packages are missing (message names the package).
        ValueError: unknown backend, or a postprocess config the lowering cannot express.
    """
    from ssd_post import exportable

    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend should be one of {BACKENDS[1:]}, got {backend!r}")
    exportable.check_detector(detector)
    export, load_tensors, load_detections = _route(backend, folder, max(max_batch, _EXAMPLE_BATCH))
    images = torch.zeros((_EXAMPLE_BATCH, 3) + tuple(detector.image_size))
    with torch.no_grad():
        locs, logits = detector(images)
    sizes = torch.tensor([list(detector.image_size)] * _EXAMPLE_BATCH, dtype=torch.int64)
    network = load_tensors(
        export(_Network(detector), (images,), "network", ["images"], ["locs", "logits"])
    )
    module, args = exportable.postprocess_module(
        detector.anchors(),
        detector.postprocess_config,
        locs,
        logits,
        sizes,
        **detector.postprocess_inputs(),
    )
    run_postprocess = load_detections(export(module, args, "postprocess", None, None))

    def postprocess_fn(
        locs: Tensor,
        logits: Tensor,
        anchors: Tensor,
        image_sizes: Sequence[Tuple[int, int]],
        config,
    ) -> "ssd_post.Detections":  # noqa: F821
        named = {
            "locs": locs,
            "logits": logits,
            "image_sizes": torch.tensor([list(hw) for hw in image_sizes], dtype=torch.int64),
        }
        return run_postprocess(*(named[name] for name in module.input_names))

    return RuntimeDetector(detector, network), postprocess_fn


def _route(backend: str, folder: str, max_batch: int):
    """(export, load tensors, load Detections) of ``backend``'s route: ``export(module,
    args, name, input_names, output_names)`` writes ``folder/name`` and returns its path."""
    if backend == "aoti":
        from ssd_post import aoti

        def export_aoti(module, args, name, input_names, output_names) -> str:
            return aoti.export_module(module, args, os.path.join(folder, f"{name}.pt2"), max_batch)

        return export_aoti, aoti.load_package, aoti.load_runner

    from ssd_post import onnx as ssd_onnx

    ssd_onnx.require(backend, f"--backend {backend}")

    def export_onnx(module, args, name, input_names, output_names) -> str:
        path = os.path.join(folder, f"{name}.onnx")
        names = {} if output_names is None else {"output_names": output_names}
        tie_order = ssd_onnx.fastest_exact_tie_order(backend)
        return ssd_onnx.export_module(module, args, path, input_names, tie_order=tie_order, **names)

    return (
        export_onnx,
        lambda path: ssd_onnx.load_session(path, backend),
        lambda path: ssd_onnx.load_runner(path, backend),
    )
