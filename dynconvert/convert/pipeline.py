"""One conversion, end to end: build -> trace/plan/passes -> train -> calibrate -> evaluate -> save."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynconvert.config import Recipe
from dynconvert.convert.base_models import describe_module, fixed_input_size, timm_architecture
from dynconvert.convert.build import build_model, file_sha256
from dynconvert.convert.evaluate import evaluate_dynamic, evaluate_static, measure_latency
from dynconvert.convert.report import build_report, plot_report
from dynconvert.convert.save import save_dynamic, versions
from dynconvert.errors import DynconvertError
from dynconvert.files import folder_replaced_on_success, write_json
from dynconvert.recipe import build_recipe
from dynconvert.strategies import get_strategy
from dynconvert.toolkit import distributed
from dynconvert.toolkit.checkpoint import CHECKPOINT, Checkpointer, work_folder
from dynconvert.toolkit.classes import ClassSubset, match_classes
from dynconvert.toolkit.data import Preprocess, first_image_size, load_conversion_data
from dynconvert.toolkit.train import NonFiniteLoss

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so a run on the same machine repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output(out: str | Path | None, force: bool) -> Path | None:
    """Refuse, before any work, an output folder that holds something, unless ``force``."""
    if out is None:
        return None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DynconvertError(f"output folder '{out}' exists and is not empty; choose another --out or pass --force")
    return out


def default_output(recipe: Recipe) -> Path:
    """``./dynconvert-out/<model>-<strategy>`` (models joined by ``+``)."""
    names = "+".join(m.name for m in recipe.model_configs())
    return Path("dynconvert-out") / f"{names}-{recipe.strategy}"


def convert_recipe(
    recipe: Recipe,
    model: nn.Module | list[nn.Module] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
):
    """Run one conversion as ``recipe`` describes; return the dynamic model (with ``.report``).

    ``model`` replaces building the recipe's model(s) with timm (a user's own module, or a list
    of them in the recipe's order).
    When ``out`` is given the recipe, model, report.json and report.png are written there, and
    training checkpoints into ``OUT.resume/`` until then; ``resume`` continues from the last
    checkpoint there (a run that stopped on a signal, an error or a crash), or starts afresh
    when there is none. Under torchrun (``WORLD_SIZE`` > 1) training is shared by the ranks
    and rank 0 writes.
    """
    created_group = distributed.init_from_env(recipe.device)
    try:
        return _convert(recipe, model, out, force, resume)
    finally:
        distributed.shutdown(created_group)


def _convert(recipe: Recipe, model, out, force: bool, resume: bool):
    started = time.perf_counter()
    recipe_sha256 = hashlib.sha256(recipe.to_yaml().encode()).hexdigest()
    checkpointer = open_checkpointer(out, force, resume, recipe_sha256)
    out_dir = None if out is None else Path(out)
    seed_everything(recipe.seed)
    strategy = get_strategy(recipe.strategy).from_options(recipe.options)
    configs = recipe.model_configs()
    if model is None:
        models = [build_model(config) for config in configs]
    else:
        models = list(model) if isinstance(model, (list, tuple)) else [model]
    handed_in = None if model is None else list(models)  # as given: what a save stores or records
    strategy.check_models(len(models))
    models = [m.to(recipe.device).eval() for m in models]
    # the last model is the reference: the static accuracy, the FLOPs ratio and the input are its
    prep = Preprocess.from_model(models[-1])
    size = input_size(models[-1], configs[-1], recipe.data, handed_in=model is not None)
    prep.input_size = (prep.input_size[0], *size)
    data = load_conversion_data(recipe.data, prep, recipe.seed)
    num_classes = _num_classes(models[-1])
    if num_classes is not None and num_classes < data.num_classes:
        raise DynconvertError(
            f"the data set has {data.num_classes} classes but the model predicts {num_classes}; "
            "use a model or weights for this label set (--set model.num_classes=N for a new head)"
        )
    num_classes = num_classes or data.num_classes
    match = match_classes(data.class_names, models[-1], num_classes)
    if match is not None:  # logits restricted to the data set's classes, static and dynamic alike
        log.info("the data set's %d classes matched the model's %d by %s", len(match.indices), num_classes, match.how)
        classes = match.describe(num_classes)
        models = [ClassSubset(m, match.indices).eval() for m in models]
        num_classes = len(match.indices)
    example = torch.randn(2, *prep.input_size, device=recipe.device)
    dyn = strategy.prepare(models, recipe, example, num_classes).to(recipe.device)
    dyn.recipe, dyn.preprocess = recipe, prep
    dyn.base_info = base_info(configs, num_classes, handed_in)
    dyn.base_modules = handed_in
    if match is not None:
        dyn.base_info["class_subset"] = classes
    model = models[-1]
    fitted = _fit(strategy, dyn, data, prep, recipe, checkpointer)
    static = evaluate_static(model, data.evaluation, prep, recipe.data.batch_size, recipe.device)
    dynamic = evaluate_dynamic(dyn, data.evaluation, prep, recipe.data.batch_size, recipe.device)
    latency = measure_latency(model, dyn, data.evaluation, prep, recipe.evaluate.latency_samples, recipe.device)
    splits = {
        "fit": data.fit.name,
        "calibration": data.calibration.name,
        "evaluation": data.evaluation.name,
        "fit_samples": len(data.fit),
        "calibration_samples": len(data.calibration),
    }
    extra = {
        "model": "+".join(c.name for c in configs),
        "strategy": recipe.strategy,
        "plan": dyn.plan,
        "classes": dyn.base_info.get("class_subset")
        or {"data_classes": data.num_classes, "model_classes": num_classes, "how": "as they are"},
        "inserted_flops": dyn.inserted_flops(),
        "calibration": fitted,
        "calibration_check": _calibration_note(recipe, data, fitted, static, dynamic),
        "latency": latency,
        "sweep_on_evaluation": strategy.sweep_on_split(dyn, data.evaluation, prep, recipe, fitted.get("sweep", [])),
        "versions": versions(),
        "recipe_sha256": recipe_sha256,
        "base": dyn.base_info,
        "seconds": time.perf_counter() - started,
    }
    report = build_report(static, dynamic, dyn.static_flops(), splits, extra)
    dyn.report = report
    if out_dir is not None:
        if distributed.is_main():
            write_outputs(dyn, report, out_dir)
        checkpointer.discard()
    return dyn


def open_checkpointer(out: str | Path | None, force: bool, resume: bool, recipe_sha256: str) -> Checkpointer:
    """The checkpointer of a conversion writing to ``out``, after checking the output folder.

    Resuming from a checkpoint needs no ``force``: the run that wrote it was allowed to
    replace the output. A corrupt checkpoint or one of another recipe stops here, before
    anything is touched. Without ``resume`` what an earlier run left is removed.
    """
    if out is None:
        if resume:
            raise DynconvertError("resuming needs the output folder of the interrupted run (--out)")
        return Checkpointer.disabled()
    folder = work_folder(Path(out))
    if not (resume and (folder / CHECKPOINT).is_file()):
        check_output(out, force)
    checkpointer = Checkpointer(folder, recipe_sha256, resume=resume)
    if not resume:
        checkpointer.start_fresh()
    return checkpointer


def base_info(configs, num_classes: int, handed_in: list[nn.Module] | None = None) -> dict:
    """What the saved model records of its base network(s): name, weights file and its sha256;
    for modules handed in, how to rebuild them (``base_models.describe_module``).

    One model keeps the flat form (``model``, ``weights``, ``weights_sha256``); several are
    listed under ``models`` in the recipe's order.
    """
    bases = [
        {
            "model": c.name,
            "weights": str(Path(c.weights).resolve()) if c.weights else None,
            "weights_sha256": file_sha256(c.weights) if c.weights else None,
        }
        for c in configs
    ]
    if handed_in is not None:
        bases = [{**b, **describe_module(m, k)} for k, (b, m) in enumerate(zip(bases, handed_in))]
    info = dict(bases[0]) if len(bases) == 1 else {"models": bases}
    info["num_classes"] = num_classes
    return info


def input_size(model: nn.Module, config, data_config, handed_in: bool) -> tuple[int, int]:
    """The input height and width a conversion runs at: the recipe's ``model.input_size``; else
    the size the model accepts alone (a vision transformer's ``img_size``); else, for a model
    built here by name, the size its pretrained weights were trained at, and for a module
    handed in (built for the data in hand) the data's image size when its images share one."""
    if config.input_size:
        return tuple(config.input_size)
    fixed = fixed_input_size(model)
    if fixed is not None:
        return fixed
    configured = tuple(Preprocess.from_model(model).input_size[1:])
    if handed_in:
        return first_image_size(data_config) or configured
    return configured


def _fit(strategy, dyn, data, prep, recipe: Recipe, checkpointer: Checkpointer) -> dict:
    """``strategy.fit`` under the checkpointer's signal handling."""
    try:
        with checkpointer.catch_signals():
            return strategy.fit(dyn, data, prep, recipe, checkpointer)
    except NonFiniteLoss as exc:
        raise DynconvertError(f"{exc}; {checkpointer.describe()}") from None


def write_outputs(dyn, report: dict, out_dir: Path) -> None:
    """recipe.yaml, model/, report.json and report.png into ``out_dir``.

    Everything is written into a staging folder beside it and moved into place at the end, so an
    interrupted or failed run leaves the previous output (if any) as it was.
    """
    with folder_replaced_on_success(out_dir) as staging:
        (staging / "recipe.yaml").write_text(dyn.recipe.to_yaml())
        save_dynamic(dyn, staging / "model")
        write_json(staging / "report.json", report)
        title = f"{report['model']} {report['strategy']}: {report['splits']['evaluation']} split"
        plot_report(staging / "report.png", report, title)


def _calibration_note(recipe: Recipe, data, fitted: dict, static: dict, dynamic: dict) -> dict:
    """What the calibration assumed and how its estimate compares with the evaluation."""
    held_out = data.calibration.name.startswith(data.fit.name.split("[")[0] + "[held-out")
    if recipe.calibrate.reference == "agreement":
        how = (
            "thresholds bound the disagreement with the full network's prediction, an upper bound on the "
            "accuracy lost that needs no labels the backbone may have memorised"
        )
    elif held_out:
        how = (
            "thresholds fitted to label accuracy on training images the backbone has seen; this estimate of "
            "the accuracy lost is conservative while the full network is flattered by them at least as much as "
            "the exits (compare static accuracy on calibration and evaluation data below); "
            "use calibrate.reference=agreement for a bound without that assumption"
        )
    else:
        how = "thresholds fitted to label accuracy on a validation split"
    chosen = fitted.get("chosen", {})
    return {
        "split": data.calibration.name,
        "reference": recipe.calibrate.reference,
        "method": how,
        "static_accuracy_on_calibration": fitted.get("calibration_static_accuracy"),
        "static_accuracy_on_evaluation": static["accuracy"],
        "estimated_accuracy_drop": chosen.get("accuracy_drop"),
        "estimated_accuracy_drop_bound_95": chosen.get("accuracy_drop_bound"),
        "memorised_warning": _memorised_warning(fitted),
        "measured_accuracy_drop": static["accuracy"] - dynamic["accuracy"],
        "estimated_flops_ratio": chosen.get("flops_ratio"),
    }


def _memorised_warning(fitted: dict) -> str | None:
    accuracy = fitted.get("calibration_static_accuracy")
    if accuracy is not None and accuracy >= 0.98:
        return (
            f"the static network scores {100 * accuracy:.1f}% on the calibration images: it has memorised them, "
            "so the estimated accuracy drop is optimistic; calibrate on a validation split "
            "(data.calibration_split) or lower calibrate.max_accuracy_drop"
        )
    return None


def _num_classes(model: nn.Module) -> int | None:
    value = getattr(model, "num_classes", None)
    return int(value) if isinstance(value, int) else None


def convert(
    model: str | nn.Module | list,
    strategy: str = "early-exit",
    data: str | None = None,
    recipe: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
    resume: bool = False,
    weights: str | list[str] | None = None,
    **overrides: Any,
):
    """Convert a static network (or, for a cascade, several) into a dynamic one.

    Args:
        model: a timm model name, or an ``nn.Module`` torch.fx can trace (then set
            ``model_name`` in ``overrides``; a timm model goes by its architecture, another
            module by its class name); a list of names or of
            modules, cheapest first, for a strategy that combines models.
        strategy: a registered strategy name (see ``dynconvert.list_strategies()``).
        data: a local folder ``datasets.load_dataset`` understands, or a hub name.
        recipe: a built-in recipe name or a YAML file; defaults to the model family's one.
        out: where to write recipe.yaml, model/, report.json and report.png (nothing if None).
        force: replace a non-empty ``out``.
        resume: continue an interrupted conversion to ``out`` from its last checkpoint.
        weights: local checkpoint(s), one per model in the same order.
        overrides: recipe fields, as sections (``train={"epochs": 3}``) or dotted names
            written with double underscores (``train__epochs=3``).

    Returns the dynamic model; ``.report`` holds the report, ``.route(x)`` the decisions taken.

    Example::

        dyn = dynconvert.convert("cifar_resnet56", data="cifar10", weights="r56.th")
    """
    items = list(model) if isinstance(model, (list, tuple)) else [model]
    label = overrides.pop("model_name", None)
    names = [m if isinstance(m, str) else (label or timm_architecture(m) or type(m).__name__) for m in items]
    modules = None if all(isinstance(m, str) for m in items) else items
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flatten_dict(value).items()})
        else:
            flat[key.replace("__", ".")] = value
    if data is not None:
        flat["data.path"] = data
    if weights is not None:
        weights = [str(w) for w in ([weights] if isinstance(weights, (str, Path)) else weights)]
    resolved = build_recipe(recipe, names if len(names) > 1 else names[0], strategy, flat, weights)
    return convert_recipe(resolved, modules, out, force, resume)


def _flatten_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
