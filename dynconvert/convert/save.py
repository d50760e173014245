"""Save a dynamic model (recipe, versions, base-weights hash, inserted state) and load it back.

Loading rebuilds the base network from the recipe, replays the strategy's passes at the
recorded points and loads the inserted state: the base weights are never copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from dynconvert.config import Recipe
from dynconvert.convert.base_models import missing_module_error, rebuild, store_weights
from dynconvert.errors import DynconvertError
from dynconvert.files import folder_replaced_on_success
from dynconvert.runtime.dynamic import DynamicModel
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.classes import ClassSubset
from dynconvert.toolkit.data import Preprocess

FORMAT_VERSION = 1
STATE_FILE = "dynamic.safetensors"
META_FILE = "meta.json"
RECIPE_FILE = "recipe.yaml"


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import timm

    from dynconvert.version import __version__

    return {"dynconvert": __version__, "torch": torch.__version__, "timm": timm.__version__}


def save_dynamic(dyn: DynamicModel, folder: str | Path) -> Path:
    """Write ``dyn`` to ``folder``: recipe.yaml, meta.json and dynamic.safetensors.

    Files go to a staging folder first and are moved into place at the end; a failed save
    leaves ``folder`` as it was. Example: ``dynconvert.save(dyn, "saved/")``.
    """
    folder = Path(folder)
    with folder_replaced_on_success(folder) as tmp:
        save_file(dyn.inserted_state(), str(tmp / STATE_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "strategy": dyn.recipe.strategy,
            "plan": dyn.plan,
            "base": dyn.base_info,
            "input_size": list(dyn.preprocess.input_size) if getattr(dyn, "preprocess", None) else None,
            "versions": versions(),
            "steps": ["build", "trace", "plan", "passes", "train", "calibrate"],
        }
        for record, module in zip(_bases(dyn.base_info), getattr(dyn, "base_modules", None) or []):
            if record.get("stored_weights"):
                store_weights(module, record, tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / RECIPE_FILE).write_text(dyn.recipe.to_yaml())
    return folder


def _bases(base_info: dict) -> list[dict]:
    """The recorded base networks, one entry each (a single model is stored flat)."""
    return base_info.get("models") or [base_info]


def load_dynamic(
    folder: str | Path, model: nn.Module | list[nn.Module] | None = None, device: str = "cpu"
) -> DynamicModel:
    """Rebuild a saved dynamic model.

    Args:
        folder: what :func:`save_dynamic` wrote (or a conversion's output folder).
        model: the static base network (a list for several), for conversions of a user's own
            module; timm models are rebuilt from the recipe (weights from the recorded file,
            checked by hash).
        device: where the model goes.
    """
    from dynconvert.convert.build import build_model, file_sha256
    from dynconvert.convert.pipeline import seed_everything
    from dynconvert.recipe import from_dict, upgrade_saved_recipe

    folder = Path(folder)
    if (folder / "model" / META_FILE).is_file():
        folder = folder / "model"
    if not (folder / META_FILE).is_file():
        raise DynconvertError(f"'{folder}' holds no saved dynamic model (no {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DynconvertError(f"'{folder}' was saved in format {meta.get('format_version')}; expected {FORMAT_VERSION}")
    saved = upgrade_saved_recipe(yaml.safe_load((folder / RECIPE_FILE).read_text()) or {})
    recipe = from_dict(Recipe, saved, source=str(folder / RECIPE_FILE))
    base_info = meta["base"]
    if model is None:
        for base in _bases(base_info):
            weights = base.get("weights")
            if weights and Path(weights).is_file() and file_sha256(weights) != base.get("weights_sha256"):
                raise DynconvertError(f"base weights '{weights}' changed since the model was saved (sha256 differs)")
        records = _bases(base_info)
        if any(r.get("own_module") for r in records):
            raise missing_module_error(folder, records)
        seed_everything(recipe.seed)  # a randomly initialised base is rebuilt as it was built
        models = [
            rebuild(record, folder, meta.get("input_size")) if record.get("stored_weights") else build_model(config)
            for record, config in zip(records, recipe.model_configs())
        ]
    else:
        models = list(model) if isinstance(model, (list, tuple)) else [model]
    handed_in = list(models) if any(r.get("stored_weights") for r in _bases(base_info)) else None
    strategy = get_strategy(meta["strategy"]).from_options(recipe.options)
    prep = Preprocess.from_model(models[-1])
    subset = base_info.get("class_subset")
    if subset:  # restricted to the data set's classes, as at conversion
        models = [ClassSubset(m, subset["indices"]).eval() for m in models]
    if meta.get("input_size"):  # the size the conversion ran at (inserted heads depend on it)
        prep.input_size = tuple(meta["input_size"])
    example = torch.randn(2, *prep.input_size)
    dyn = strategy.prepare(models, recipe, example, base_info["num_classes"], **meta["plan"]["replay"])
    try:
        state = load_file(str(folder / STATE_FILE))
    except Exception as exc:
        raise DynconvertError(f"'{folder / STATE_FILE}' could not be read ({exc})") from None
    # a timm instance rebuilt from its recorded arguments may still differ from the one converted
    hint = (
        "; the base network was rebuilt from its recorded arguments: pass it, dynconvert.load(path, model=...)"
        if model is None and handed_in is not None
        else ""
    )
    try:
        missing, unexpected = dyn.load_inserted_state(state)
    except ValueError as exc:
        raise DynconvertError(f"{exc}: the base model or its input size differ from the conversion's{hint}") from None
    if missing or unexpected:
        raise DynconvertError(
            f"saved state does not fit the rebuilt model: missing {missing}, unexpected {unexpected}{hint}"
        )
    dyn.recipe, dyn.base_info, dyn.preprocess = recipe, base_info, prep
    dyn.base_modules = handed_in  # a re-save stores their weights again
    return dyn.to(device).eval()
