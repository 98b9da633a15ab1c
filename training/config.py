"""The training config: one typed schema, every default in one place, checked up front.

    config = load_config("configs/tiny_shapes.yaml", {"optim.lr": 0.01})
    config.optim.lr            # 0.01
    config.data.batch_size     # 16

A YAML file in ``configs/`` has the sections of :class:`TrainConfig`; every key a file
or an override may set is a field below, with its type, default and allowed range.
:func:`load_config` checks the whole config before anything is built or trained, and a
problem is a :class:`ConfigError` whose message is one line naming the key, the value
and what is allowed (``optim.lr: got -0.1; allowed: a number > 0``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line."""


# A range check: (predicate on the already type-checked value, what is allowed).
Check = Tuple[Callable[[Any], bool], str]


def _option(default: Any, check: Optional[Check] = None, doc: str = "") -> Any:
    """A dataclass field with an optional range check (mutable defaults are copied)."""
    metadata = {"check": check, "doc": doc}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _positive(kind: str) -> Check:
    return (lambda v: v > 0, f"{kind} > 0")


def _at_least(kind: str, low: float) -> Check:
    return (lambda v: v >= low, f"{kind} >= {low:g}")


def _unit_interval(open_low: bool = False) -> Check:
    if open_low:
        return (lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
    return (lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def _one_of(*choices: Any) -> Check:
    return (lambda v: v in choices, f"one of {list(choices)}")


@dataclass
class ModelConfig:
    """``models.build_model`` arguments (options an arch does not take stay None)."""

    # Required: no default model (None here means "missing").
    arch: Optional[str] = _option(
        None,
        doc="tiny, tiny_retinanet, ssd300_vgg16, ssdlite320_mobilenet_v3_large or "
        "retinanet_resnet50_fpn",
    )
    num_classes: Optional[int] = _option(
        None, _at_least("an integer", 2), "logit columns, background included"
    )
    image_size: Optional[List[int]] = _option(
        None, doc="(h, w) network input; tiny, tiny_retinanet and retinanet only"
    )
    width: Optional[int] = _option(
        None,
        _at_least("an integer", 1),
        "channels of the first stage; tiny and tiny_retinanet only",
    )
    postprocess: Dict[str, Any] = _option({}, doc="PostprocessConfig fields to override")

    def build_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of ``build_model`` after ``arch`` and ``num_classes``."""
        options: Dict[str, Any] = {
            "postprocess": dict(self.postprocess) or None,
            "image_size": self.image_size,
            "width": self.width,
        }
        return {key: value for key, value in options.items() if value is not None}


@dataclass
class AugmentConfig:
    """The SSD training augmentation (``training.data.transforms.train_transforms``)."""

    photometric_p: float = _option(
        0.5, _unit_interval(), "brightness/contrast/saturation/hue jitter"
    )
    expand_p: float = _option(0.5, _unit_interval(), "zoom out onto a mean-coloured canvas")
    max_expand: float = _option(3.0, _at_least("a number", 1.0), "largest zoom-out factor")
    crop_p: float = _option(0.5, _unit_interval(), "IoU-constrained random crop")
    flip_p: float = _option(0.5, _unit_interval(), "horizontal flip")
    min_visibility: float = _option(0.3, _unit_interval(), "drop boxes keeping less of their area")


@dataclass
class DataConfig:
    """Where the images come from and how they are batched."""

    kind: str = _option("shapes", _one_of("shapes", "coco"), "generated shapes, or COCO files")
    root: str = _option("data/shapes")
    seed: int = _option(0, doc="shapes only")
    num_train: int = _option(3000, _at_least("an integer", 1), "shapes only")
    num_val: int = _option(500, _at_least("an integer", 1), "shapes only")
    train_images: str = _option("train2017", doc="coco only, relative to root")
    train_ann: str = _option("annotations/instances_train2017.json", doc="coco only")
    val_images: str = _option("val2017", doc="coco only")
    val_ann: str = _option("annotations/instances_val2017.json", doc="coco only")
    contiguous_labels: bool = _option(True, doc="False: label = COCO category id (91 columns)")
    batch_size: int = _option(32, _at_least("an integer", 1), "images per step and device")
    num_workers: int = _option(1, _at_least("an integer", 0), "DataLoader worker processes")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    """Optimiser and the warm-up + cosine learning-rate schedule."""

    name: str = _option("sgd", _one_of("sgd", "adamw"), "sgd (Nesterov momentum) or adamw")
    lr: float = _option(0.01, _positive("a number"))
    weight_decay: float = _option(
        5e-4, _at_least("a number", 0.0), "not applied to BatchNorm and biases"
    )
    momentum: float = _option(0.9, (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"), "sgd only")
    warmup_steps: int = _option(
        200, _at_least("an integer", 0), "linear warm-up from warmup_factor * lr"
    )
    warmup_factor: float = _option(0.01, _unit_interval(open_low=True))
    min_lr_ratio: float = _option(0.01, _unit_interval(), "the cosine ends at min_lr_ratio * lr")
    time_budget_s: Optional[float] = _option(
        None, _positive("a number"), "also end the cosine when this much wall clock has passed"
    )


@dataclass
class LossConfig:
    """The architecture's loss: SSD's MultiBox, or RetinaNet's focal loss (torchvision's)."""

    iou_thresh: float = _option(0.5, _unit_interval(open_low=True), "anchor-to-box match threshold")
    neg_pos_ratio: int = _option(
        3, _at_least("an integer", 1), "hard negatives per positive; SSD only"
    )
    bg_iou_thresh: float = _option(
        0.4, _unit_interval(), "background below this IoU, ignored up to iou_thresh; RetinaNet only"
    )


@dataclass
class TrainerConfig:
    """``pytorch_lightning.Trainer`` arguments (None: Lightning's default)."""

    max_epochs: int = _option(10, _at_least("an integer", 1))
    max_time: Optional[str] = _option(
        None,
        (lambda v: re.fullmatch(r"\d+:\d\d:\d\d:\d\d", v) is not None, '"DD:HH:MM:SS"'),
        "wall-clock cap",
    )
    accelerator: str = _option("auto", doc="cpu, gpu or auto")
    devices: Union[int, str] = _option(
        1, (lambda v: v == "auto" or (isinstance(v, int) and v >= 1), "an integer >= 1 or 'auto'")
    )
    num_nodes: int = _option(1, _at_least("an integer", 1))
    strategy: str = _option("auto", doc="auto, ddp, ddp_spawn, ...")
    precision: Union[int, str] = _option("32-true")
    check_val_every_n_epoch: int = _option(1, _at_least("an integer", 1))
    log_every_n_steps: int = _option(20, _at_least("an integer", 1))
    gradient_clip_val: Optional[float] = _option(None, _at_least("a number", 0.0))
    limit_train_batches: Optional[Union[int, float]] = _option(None, _positive("a number"))
    limit_val_batches: Optional[Union[int, float]] = _option(None, _positive("a number"))
    num_sanity_val_steps: int = _option(0, _at_least("an integer", -1))
    enable_progress_bar: bool = _option(True)


@dataclass
class TrainConfig:
    """A whole config file."""

    seed: int = _option(0)
    output_dir: str = _option("outputs/run")
    export: Optional[str] = _option(None, doc="extra path for a copy of the final detector.pt")
    threads: Optional[int] = _option(None, _at_least("an integer", 1), "torch intra-op threads")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # The file it was read from (for messages); not a config key.
    path: str = field(default="", metadata={"internal": True})


def to_dict(config: Any) -> Dict[str, Any]:
    """The config as plain dicts (for logs and Lightning's saved hyperparameters)."""
    return {
        f.name: (
            to_dict(getattr(config, f.name))
            if dataclasses.is_dataclass(getattr(config, f.name))
            else getattr(config, f.name)
        )
        for f in dataclasses.fields(config)
        if not f.metadata.get("internal")
    }


# ------------------------------------------------------------------------------- checking


def _describe(tp: Any) -> str:
    """What a type annotation allows, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, List):
        return f"a list of {_describe(args[0])}"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )


def _convert(tp: Any, value: Any) -> Tuple[bool, Any]:
    """(matches, converted value) of ``value`` against annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        for arg in args:
            ok, converted = _convert(arg, value)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string: accept a string that is a number.
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_convert(args[0], item) for item in value]
        return all(ok for ok, _ in items), [converted for _, converted in items]
    if origin in (dict, Dict):
        return isinstance(value, dict), dict(value) if isinstance(value, dict) else value
    raise TypeError(f"no rule for annotation {tp!r}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """An instance of dataclass ``cls`` from ``raw`` (a mapping), every key checked."""
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: got {raw!r}; allowed: a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(str(key) for key in raw if key not in fields)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key; allowed in {where}: {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values: Dict[str, Any] = {}
    for name, value in raw.items():
        key, tp = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, f"{key}.")
            continue
        ok, converted = _convert(tp, value)
        if not ok:
            raise ConfigError(f"{key}: got {value!r}; allowed: {_describe(tp)}")
        check = fields[name].metadata.get("check")
        if check is not None and converted is not None and not check[0](converted):
            raise ConfigError(f"{key}: got {value!r}; allowed: {check[1]}")
        values[name] = converted
    return cls(**values)


def _check_model(model: ModelConfig) -> None:
    """The model section against ``models``' own rules (arch names, per-arch options)."""
    from models import ARCHS, check_model_options

    if model.arch is None:
        raise ConfigError(f"model.arch: missing; allowed: one of {list(ARCHS)}")
    if model.num_classes is None:
        raise ConfigError(
            "model.num_classes: missing; allowed: an integer >= 2 (background included)"
        )
    try:
        check_model_options(model.arch, model.num_classes, **model.build_kwargs())
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err


def _check_loss(loss: LossConfig) -> None:
    """What one key's range cannot say: the background IoU is below the foreground one."""
    if loss.bg_iou_thresh > loss.iou_thresh:
        raise ConfigError(
            f"loss.bg_iou_thresh: {loss.bg_iou_thresh!r}; allowed: a number <= "
            f"loss.iou_thresh ({loss.iou_thresh!r})"
        )


def parse_override(item: str) -> Tuple[str, Any]:
    """``"optim.lr=0.01"`` -> ``("optim.lr", 0.01)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set: got {item!r}; allowed: SECTION.KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {key}: got {text!r}; allowed: a YAML value ({_first_line(err)})"
        ) from err


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _set_dotted(raw: Dict[str, Any], key: str, value: Any) -> None:
    """Sets ``raw["a"]["b"] = value`` for key ``"a.b"``, creating sections as needed."""
    *sections, name = key.split(".")
    node = raw
    for depth, section in enumerate(sections):
        child = node.get(section)
        if child is None:
            child = node[section] = {}
        if not isinstance(child, dict):
            prefix = ".".join(sections[: depth + 1])
            raise ConfigError(
                f"{key}: {prefix} is {child!r}, which has no keys; allowed: a mapping"
            )
        node = child
    node[name] = value


def read_yaml(path: str) -> Dict[str, Any]:
    """The raw mapping of a YAML config file (problems as ConfigError)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {_first_line(err)}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: got a {type(raw).__name__}; allowed: a mapping of sections")
    return raw


def load_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> TrainConfig:
    """Reads, overrides and checks a training config.

    Args:
        path: a YAML file (see ``configs/``).
        overrides: dotted key -> value (``{"optim.lr": 0.01, "trainer.devices": 2}``),
            applied to the file's values before the check.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown, of the
            wrong type or out of range; the message names the file, the key, the
            value and what is allowed.
    """
    raw = read_yaml(path)
    try:
        for key, value in (overrides or {}).items():
            _set_dotted(raw, key, value)
        config = _build(TrainConfig, raw, "")
        _check_model(config.model)
        _check_loss(config.loss)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    config.path = path
    return config


def config_from_dict(raw: Mapping[str, Any]) -> TrainConfig:
    """A checked config from plain dicts (a test, or Lightning's saved hyperparameters)."""
    config = _build(TrainConfig, dict(raw), "")
    _check_model(config.model)
    _check_loss(config.loss)
    return config


def section(cls: type, raw: Optional[Mapping[str, Any]], name: str) -> Any:
    """One checked section, e.g. ``section(OptimConfig, {"lr": 0.1}, "optim")``."""
    return _build(cls, raw, f"{name}.")


__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainerConfig",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_yaml",
    "section",
    "to_dict",
]
