"""Plain detector checkpoints: ``{"model_config": dict, "state_dict": dict}``.

They hold only tensors and plain Python values, so they load with
``torch.load(..., weights_only=True)``, which never runs code from the file.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Optional

import torch

from .detector import SingleStageDetector

CHECKED_KEYS = ("arch", "num_classes")


def save_detector(model: SingleStageDetector, path: str) -> None:
    """Writes ``model``'s config and weights (moved to CPU) to ``path``."""
    if not isinstance(model, SingleStageDetector):
        raise ValueError(f"model should be a SingleStageDetector, got {type(model).__name__}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save({"model_config": model.model_config(), "state_dict": state}, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint behind


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict, read with ``weights_only=True``; ValueError when the file
    is not a detector checkpoint or would need to run code to load."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load: the file needs to run code (a pickled object that is not "
            "plain tensors and values); only checkpoints written by save_detector are accepted "
            f"({err})"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("model_config"), dict)
        or not isinstance(data.get("state_dict"), dict)
    ):
        raise ValueError(
            f"{path}: should hold a dict with 'model_config' and 'state_dict' "
            "(written by save_detector)"
        )
    return data


def load_detector(path: str, expected: Optional[Dict[str, Any]] = None) -> SingleStageDetector:
    """Rebuilds the detector saved by :func:`save_detector`.

    Args:
        path: the checkpoint file.
        expected: values that the checkpoint's ``model_config`` must have, e.g.
            ``{"arch": "tiny", "num_classes": 5}``.

    Raises:
        ValueError: the file would run code when unpickled, is not a detector
            checkpoint, or its config differs from ``expected`` (naming the key).
    """
    from . import build_model

    data = read_checkpoint(path)
    config = dict(data["model_config"])
    for key, value in (expected or {}).items():
        if key not in config:
            raise ValueError(f"{path}: model_config has no {key!r} (expected {value!r})")
        found = config[key]
        if (list(found) if isinstance(found, (list, tuple)) else found) != (
            list(value) if isinstance(value, (list, tuple)) else value
        ):
            raise ValueError(
                f"{path}: {key} mismatch: checkpoint has {found!r}, expected {value!r}"
            )
    for key in CHECKED_KEYS:
        if key not in config:
            raise ValueError(f"{path}: model_config lacks {key!r}")
    arch, num_classes = config.pop("arch"), config.pop("num_classes")
    try:
        model = build_model(arch, num_classes, **config)
    except ValueError as err:  # a stored option edited or damaged after saving
        raise ValueError(f"{path}: model_config is invalid: {err}") from err
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path}: weights do not fit {arch} with {num_classes} classes: {err}"
        ) from err
    return model
