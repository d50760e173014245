"""Recipes: how one conversion is described, read and resolved.

A recipe is built from (in order of precedence, last wins) the built-in recipe or file
named by ``--recipe``, the command-line flags, and ``--set a.b=value`` overrides. Unknown
keys, wrong types and out-of-range values raise :class:`DynconvertError` naming the key
and, where there is one, the file. The dataclasses live in ``dynconvert.config``; the
strategy's own ``options`` are validated by the strategy's config class.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dynconvert.config import CalibrateConfig, DataConfig, EvaluateConfig, ModelConfig, Recipe, TrainConfig
from dynconvert.errors import DynconvertError
from dynconvert.options import from_dict as _from_dict
from dynconvert.strategies import get_strategy

__all__ = [
    "CalibrateConfig",
    "DataConfig",
    "EvaluateConfig",
    "ModelConfig",
    "Recipe",
    "TrainConfig",
    "build_recipe",
    "builtin_recipe_names",
    "from_dict",
    "strategy_config",
    "validate_recipe",
]

# keys that were shared recipe sections and now belong to the strategy that reads them
MOVED = {
    "calibrate.cost": "options.cost (early-exit)",
    "calibrate.head_overhead_mflops": "options.head_overhead_mflops (early-exit)",
    "calibrate.latency_runtime": "options.latency_runtime (early-exit)",
    "calibrate.latency_threads": "options.latency_threads (early-exit)",
    "train.tune_backbone": "options.tune_backbone (skipnet) or options.finetune_modules (blockdrop)",
    "train.backbone_lr": "options.backbone_lr (skipnet, blockdrop)",
}


# where each moved key went, per strategy that reads it (others dropped the key)
_UPGRADES = {
    ("calibrate", "cost"): {"early-exit": "cost"},
    ("calibrate", "head_overhead_mflops"): {"early-exit": "head_overhead_mflops"},
    ("calibrate", "latency_runtime"): {"early-exit": "latency_runtime"},
    ("calibrate", "latency_threads"): {"early-exit": "latency_threads"},
    ("train", "tune_backbone"): {"skipnet": "tune_backbone"},
    ("train", "backbone_lr"): {"skipnet": "backbone_lr", "blockdrop": "backbone_lr"},
}


def upgrade_saved_recipe(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe saved by an earlier version, in today's form: the keys that moved from shared
    sections into a strategy's ``options`` are moved there (or dropped where the strategy has
    no such option), so conversions saved before still load. Returns ``data``, changed in place."""
    strategy = str(data.get("strategy", "early-exit")).replace("_", "-")
    for (section, key), targets in _UPGRADES.items():
        values = data.get(section)
        if isinstance(values, dict) and key in values:
            value = values.pop(key)
            if strategy in targets:
                data.setdefault("options", {}).setdefault(targets[strategy], value)
    return data


def from_dict(cls, data: dict[str, Any] | None, where: str = "", source: str | None = None):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys (naming moved ones) and wrong types."""
    return _from_dict(cls, data, where, source, MOVED)


def strategy_config(recipe: Recipe, strategy=None):
    """The strategy's own config dataclass, built from ``recipe.options`` and validated."""
    strategy = strategy or get_strategy(recipe.strategy)
    config = from_dict(strategy.config_class, recipe.options, where="options")
    if hasattr(config, "validate"):
        config.validate()
    return config


def validate_recipe(recipe: Recipe) -> None:
    """Check every section and the strategy's options; raise :class:`DynconvertError` on the first problem."""
    strategy = get_strategy(recipe.strategy)
    recipe.validate_sections()
    strategy_config(recipe, strategy)
    strategy.check_models(len(recipe.model_configs()))


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


# model name prefixes that share built-in recipes, and the family name the recipes carry
FAMILIES = (
    ("cifar_resnet", "cifar_resnet"),
    ("tf_efficientnet_lite", "efficientnet"),
    ("efficientnet_", "efficientnet"),
    ("tf_efficientnet_", "efficientnet"),
    ("mobilenetv", "efficientnet"),
)


def default_recipe_name(model_name: str, strategy: str) -> str | None:
    """The built-in recipe for a model family and strategy, or None when there is none."""
    names = builtin_recipe_names()
    family = next((f for prefix, f in FAMILIES if model_name.startswith(prefix)), model_name)
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
    model: str | list[str] | None = None,
    strategy: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    weights: list[str] | None = None,
) -> Recipe:
    """Resolve a recipe from a built-in name or file, the model(s) and strategy, and overrides.

    ``model`` is one timm name, or several (cheapest first) for a strategy that combines
    models; ``weights`` gives each its local checkpoint, in the same order. Example::

        recipe = build_recipe(model="cifar_resnet56", strategy="early-exit",
                              overrides=["train.epochs=3"])
    """
    names = [model] if isinstance(model, str) else list(model or [])
    source = None
    data: dict[str, Any] = {}
    name = recipe or (default_recipe_name(names[0], strategy or "early-exit") if names else None)
    if name:
        data, source = read_recipe_source(name)
        from_dict(Recipe, data, source=source)  # errors in the file itself name the file
    if weights and len(weights) != max(1, len(names)):
        raise DynconvertError(f"got {len(weights)} weights files for {len(names)} models; give one per model, in order")
    if len(names) > 1:
        listed = data.get("models") or []
        data["models"] = [{**(listed[i] if i < len(listed) else {}), "name": n} for i, n in enumerate(names)]
        for entry, path in zip(data["models"], weights or []):
            entry["weights"] = path
    elif names:
        data.setdefault("model", {})["name"] = names[0]
        if weights:
            data["model"]["weights"] = weights[0]
    if strategy:
        data["strategy"] = strategy
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for keys, value in items:
        apply_override(data, keys.split(".") if isinstance(keys, str) else keys, value)
    if data.get("models") and isinstance(data.get("model"), dict):
        # with several models, the model section (pretrained, num_classes, ...) applies to each
        shared = {k: v for k, v in data.pop("model").items() if k != "name"}
        data["models"] = [{**shared, **entry} if isinstance(entry, dict) else entry for entry in data["models"]]
    result = from_dict(Recipe, data, source="the overrides" if items else source)
    if not result.model_configs()[0].name:
        raise DynconvertError("the recipe names no model: pass MODEL on the command line or set model.name")
    validate_recipe(result)
    return result
