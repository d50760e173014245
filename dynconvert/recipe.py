"""Recipes: the dataclasses that describe one conversion, loaded from YAML and validated once.

A recipe is built from (in order of precedence, last wins) the built-in recipe or file
named by ``--recipe``, the command-line flags, and ``--set a.b=value`` overrides. Unknown
keys, wrong types and out-of-range values raise :class:`DynconvertError` naming the key
and, where there is one, the file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dynconvert.errors import DynconvertError


@dataclass
class ModelConfig:
    """Which static network to convert."""

    name: str = ""
    weights: str | None = None
    pretrained: bool = True
    num_classes: int | None = None
    leaf_modules: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    path: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    train_split: str = "train"
    calibration_split: str | None = None
    eval_split: str | None = None
    calibration_fraction: float = 0.1
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int = 256
    cache: bool = True

    def validate(self) -> None:
        _check_range("data.calibration_fraction", self.calibration_fraction, 0.0, 0.9)
        _check_range("data.batch_size", self.batch_size, 1, None)


@dataclass
class TrainConfig:
    """How the inserted modules are fitted."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    distill_temperature: float = 3.0
    distill_weight: float = 0.5
    tune_backbone: list[str] = field(default_factory=list)
    backbone_lr: float = 1e-4

    def validate(self) -> None:
        _check_range("train.epochs", self.epochs, 0, None)
        _check_range("train.batch_size", self.batch_size, 1, None)
        _check_range("train.lr", self.lr, 0.0, None)
        _check_range("train.distill_weight", self.distill_weight, 0.0, 1.0)
        _check_range("train.distill_temperature", self.distill_temperature, 1e-3, None)


@dataclass
class CalibrateConfig:
    """The budget the run-time decisions are fitted to, on held-out training data."""

    max_accuracy_drop: float | None = 0.01
    flops_ratio: float | None = None
    criterion: str = "max_softmax"
    reference: str = "labels"
    cost: str = "flops"
    # with cost "flops": what each head run costs on top of its FLOPs, in MFLOPs, when choosing
    # thresholds (a head's time is its few operators more than its FLOPs); reports count FLOPs only
    head_overhead_mflops: float = 0.0
    # where ``cost: latency`` measures: in PyTorch, or in onnxruntime (CPU) for a model that
    # will be deployed as ONNX; threads 0: the runtime's own default
    latency_runtime: str = "pytorch"
    latency_threads: int = 0

    def validate(self) -> None:
        if (self.max_accuracy_drop is None) == (self.flops_ratio is None):
            raise DynconvertError(
                "calibrate: set exactly one of max_accuracy_drop and flops_ratio "
                "(for example --set calibrate.flops_ratio=0.5 --set calibrate.max_accuracy_drop=null)"
            )
        if self.max_accuracy_drop is not None:
            _check_range("calibrate.max_accuracy_drop", self.max_accuracy_drop, 0.0, 1.0)
        if self.flops_ratio is not None:
            _check_range("calibrate.flops_ratio", self.flops_ratio, 0.0, 1.0)
        _check_choice("calibrate.criterion", self.criterion, ("max_softmax", "entropy"))
        _check_choice("calibrate.reference", self.reference, ("agreement", "labels"))
        _check_choice("calibrate.cost", self.cost, ("flops", "latency"))
        _check_choice("calibrate.latency_runtime", self.latency_runtime, ("pytorch", "onnxruntime"))
        _check_range("calibrate.latency_threads", self.latency_threads, 0, None)
        _check_range("calibrate.head_overhead_mflops", self.head_overhead_mflops, 0.0, None)


@dataclass
class EvaluateConfig:
    """What is measured on the evaluation split."""

    latency_samples: int = 200

    def validate(self) -> None:
        _check_range("evaluate.latency_samples", self.latency_samples, 0, None)


@dataclass
class Recipe:
    """Everything one conversion needs; written into the output folder as ``recipe.yaml``."""

    strategy: str = "early-exit"
    seed: int = 0
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check every section; raise :class:`DynconvertError` on the first problem."""
        from dynconvert.strategies import get_strategy

        strategy = get_strategy(self.strategy)
        for section in (self.data, self.train, self.calibrate, self.evaluate):
            section.validate()
        _check_range("seed", self.seed, 0, 2**32 - 1)
        _check_range("model.num_classes", self.model.num_classes, 1, None)
        _check_choice("device", self.device.split(":")[0], ("cpu", "cuda"))
        strategy_config(self, strategy)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def strategy_config(recipe: Recipe, strategy=None):
    """The strategy's own config dataclass, built from ``recipe.options`` and validated."""
    from dynconvert.strategies import get_strategy

    strategy = strategy or get_strategy(recipe.strategy)
    config = from_dict(strategy.config_class, recipe.options, where="options")
    if hasattr(config, "validate"):
        config.validate()
    return config


def from_dict(cls, data: dict[str, Any] | None, where: str = "", source: str | None = None):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise DynconvertError(f"{_where(where, source)} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise DynconvertError(
                f"unknown recipe key '{_join(where, key)}'{_in(source)}; valid keys here: {', '.join(sorted(valid))}"
            )
        kwargs[key] = _coerce(hints[key], value, _join(where, key), source)
    return cls(**kwargs)


def _coerce(hint, value, key: str, source: str | None):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key, source)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], v, key, source) for v in value] if args else value
    if origin is dict or hint is Any:
        if origin is dict and not isinstance(value, dict):
            raise DynconvertError(f"recipe key '{key}'{_in(source)} must be a mapping")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is str and isinstance(value, str):
        return value
    raise DynconvertError(f"recipe key '{key}'{_in(source)} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _check_range(key: str, value, low, high) -> None:
    if value is None:
        return
    if value != value:  # NaN passes every comparison
        raise DynconvertError(f"recipe key '{key}' must be a number, got NaN")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise DynconvertError(f"recipe key '{key}' must be {bounds}, got {value}")


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise DynconvertError(f"recipe key '{key}' must be one of {', '.join(choices)}, got {value!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _where(where: str, source: str | None) -> str:
    return f"recipe section '{where or '(top)'}'{_in(source)}"


def _in(source: str | None) -> str:
    return f" in {source}" if source else ""


def builtin_recipe_names() -> list[str]:
    """Names of the recipes shipped with dynconvert (``recipes/*.yaml``)."""
    folder = resources.files("dynconvert") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe_source(name_or_path: str) -> tuple[dict[str, Any], str]:
    """Read a built-in recipe by name (first) or a YAML file by path; return (dict, source)."""
    if name_or_path in builtin_recipe_names():
        text = (resources.files("dynconvert") / "recipes" / f"{name_or_path}.yaml").read_text()
        source = f"built-in recipe '{name_or_path}'"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise DynconvertError(
                f"recipe '{name_or_path}' is neither a built-in recipe ({', '.join(builtin_recipe_names())}) nor a file"
            )
        text = path.read_text()
        source = str(path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise DynconvertError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise DynconvertError(f"{source} must hold a mapping of recipe sections")
    data.pop("builtin", None)
    return data, source


def default_recipe_name(model_name: str, strategy: str) -> str | None:
    """The built-in recipe for a model family and strategy, or None when there is none."""
    names = builtin_recipe_names()
    family = "cifar_resnet" if model_name.startswith("cifar_resnet") else model_name
    candidate = f"{family}-{strategy}"
    return candidate if candidate in names else None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise DynconvertError(f"--set expects KEY=VALUE (for example train.epochs=3), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``data[k1][k2]... = value``, creating sections as needed (validated later)."""
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise DynconvertError(f"--set {'.'.join(keys)}: '{key}' is not a section")
    node[keys[-1]] = value


def build_recipe(
    recipe: str | None = None,
    model: str | None = None,
    strategy: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Recipe:
    """Resolve a recipe from a built-in name or file, a model and strategy, and overrides.

    Example::

        recipe = build_recipe(model="cifar_resnet56", strategy="early-exit",
                              overrides=["train.epochs=3"])
    """
    source = None
    data: dict[str, Any] = {}
    name = recipe or (default_recipe_name(model, strategy or "early-exit") if model else None)
    if name:
        data, source = read_recipe_source(name)
        from_dict(Recipe, data, source=source)  # errors in the file itself name the file
    if model:
        data.setdefault("model", {})["name"] = model
    if strategy:
        data["strategy"] = strategy
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for keys, value in items:
        apply_override(data, keys.split(".") if isinstance(keys, str) else keys, value)
    result = from_dict(Recipe, data, source="the overrides" if items else source)
    if not result.model.name:
        raise DynconvertError("the recipe names no model: pass MODEL on the command line or set model.name")
    result.validate()
    return result
