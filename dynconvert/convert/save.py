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

from dynconvert.errors import DynconvertError
from dynconvert.files import folder_replaced_on_success

FORMAT_VERSION = 1
STATE_FILE = "dynamic.safetensors"
META_FILE = "meta.json"
RECIPE_FILE = "recipe.yaml"


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import timm

    from dynconvert import __version__

    return {"dynconvert": __version__, "torch": torch.__version__, "timm": timm.__version__}


def save_dynamic(dyn: nn.Module, folder: str | Path) -> Path:
    """Write ``dyn`` to ``folder``: recipe.yaml, meta.json and dynamic.safetensors.

    Files go to a staging folder first and are moved into place at the end; a failed save
    leaves ``folder`` as it was.
    """
    folder = Path(folder)
    with folder_replaced_on_success(folder) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in dyn.state_dict().items() if k.startswith("dyn.")}
        save_file(state, str(tmp / STATE_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "strategy": dyn.recipe.strategy,
            "plan": dyn.plan,
            "base": dyn.base_info,
            "input_size": list(dyn.preprocess.input_size) if getattr(dyn, "preprocess", None) else None,
            "versions": versions(),
            "steps": ["build", "trace", "plan", "passes", "train", "calibrate"],
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / RECIPE_FILE).write_text(dyn.recipe.to_yaml())
    return folder


def load_dynamic(folder: str | Path, model: nn.Module | None = None, device: str = "cpu") -> nn.Module:
    """Rebuild a saved dynamic model.

    Args:
        folder: what :func:`save_dynamic` wrote (or a conversion's output folder).
        model: the static base network, for conversions of a user's own module; timm models
            are rebuilt from the recipe (weights from the recorded file, checked by hash).
    """
    from dynconvert.convert.build import build_model, file_sha256
    from dynconvert.convert.data import Preprocess
    from dynconvert.recipe import Recipe, from_dict, strategy_config
    from dynconvert.strategies import get_strategy

    folder = Path(folder)
    if (folder / "model" / META_FILE).is_file():
        folder = folder / "model"
    if not (folder / META_FILE).is_file():
        raise DynconvertError(f"'{folder}' holds no saved dynamic model (no {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DynconvertError(f"'{folder}' was saved in format {meta.get('format_version')}; expected {FORMAT_VERSION}")
    recipe = from_dict(Recipe, yaml.safe_load((folder / RECIPE_FILE).read_text()), source=str(folder / RECIPE_FILE))
    base_info = meta["base"]
    if model is None:
        weights = base_info.get("weights")
        if weights and Path(weights).is_file() and file_sha256(weights) != base_info.get("weights_sha256"):
            raise DynconvertError(f"base weights '{weights}' changed since the model was saved (sha256 differs)")
        from dynconvert.convert.pipeline import seed_everything

        seed_everything(recipe.seed)  # a randomly initialised base is rebuilt as it was built
        model = build_model(recipe.model)
    strategy = get_strategy(meta["strategy"])
    config = strategy_config(recipe, strategy)
    prep = Preprocess.from_model(model)
    if meta.get("input_size"):  # the size the conversion ran at (inserted heads depend on it)
        prep.input_size = tuple(meta["input_size"])
    example = torch.randn(2, *prep.input_size)
    dyn = strategy.prepare(model, recipe, config, example, base_info["num_classes"], **meta["plan"]["replay"])
    try:
        state = load_file(str(folder / STATE_FILE))
    except Exception as exc:
        raise DynconvertError(f"'{folder / STATE_FILE}' could not be read ({exc})") from None
    missing, unexpected = _load_inserted(dyn, state)
    if missing or unexpected:
        raise DynconvertError(f"saved state does not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    dyn.recipe, dyn.base_info, dyn.preprocess = recipe, base_info, prep
    return dyn.to(device).eval()


def _load_inserted(dyn: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    own = {k: v for k, v in dyn.state_dict().items() if k.startswith("dyn.")}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise DynconvertError(
            f"saved tensor '{k}' has shape {tuple(state[k].shape)}, the rebuilt model expects "
            f"{tuple(own[k].shape)}: the base model or its input size differ from the conversion's"
        )
    if not missing and not unexpected:
        dyn.load_state_dict(state, strict=False)
    return missing, unexpected
