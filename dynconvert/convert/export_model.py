"""``dynconvert.export_onnx``: a converted model to ONNX, in the form its strategy gives it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dynconvert.errors import DynconvertError
from dynconvert.export.onnx_export import export_dynamic_onnx, input_size_of
from dynconvert.runtime.dynamic import DynamicModel
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.data import load_conversion_data, normalize

log = logging.getLogger(__name__)


def export_onnx(
    dyn: DynamicModel,
    path: str | Path,
    *,
    form: str | None = None,
    images: torch.Tensor | None = None,
    random_inputs: int = 64,
    overwrite: bool = False,
) -> dict:
    """Export ``dyn`` to ONNX at ``path`` (batch dimension dynamic) and check it.

    The graph returns the logits and the decisions and computes nothing for exited samples or
    skipped blocks (see docs/export.md; ``form`` ``"gather"`` or ``"cond"``, None for the
    strategy's default). The check runs ``images`` (normalized; None: the evaluation split of
    the model's recipe when it can be read) and ``random_inputs`` random inputs through
    onnxruntime and PyTorch and writes its report to ``PATH.check.json``. Returns the report.

    Raises DynconvertError when a file exists and ``overwrite`` is false, when the strategy has
    no export or export fails, or when the check fails (then no model is written).

    Example: ``dynconvert.export_onnx(dynconvert.load("out/"), "out/model.onnx")``
    """
    recipe = getattr(dyn, "recipe", None)
    if recipe is None:
        raise DynconvertError("the model carries no recipe: export a model from dynconvert.convert or dynconvert.load")
    strategy = get_strategy(recipe.strategy).from_options(recipe.options)
    dyn = dyn.eval()
    if images is None:
        images = _evaluation_images(dyn)
    example = images[:1] if images is not None else torch.randn(1, *input_size_of(dyn, None))
    try:
        graph = strategy.export_graph(dyn, example, form)
    except (TypeError, ValueError) as exc:
        raise DynconvertError(str(exc)) from None
    return export_dynamic_onnx(dyn, graph, path, images=images, random_inputs=random_inputs, overwrite=overwrite)


def _evaluation_images(dyn: DynamicModel, limit: int = 512) -> torch.Tensor | None:
    """The evaluation split of the model's recipe (normalized), or None when it cannot be read."""
    recipe, prep = getattr(dyn, "recipe", None), getattr(dyn, "preprocess", None)
    if recipe is None or prep is None or not recipe.data.path:
        log.warning("no data set recorded with the model: the ONNX check uses random inputs only")
        return None
    try:
        split = load_conversion_data(recipe.data, prep, recipe.seed).evaluation
    except DynconvertError as exc:
        log.warning("the ONNX check uses random inputs only: %s", exc)
        return None
    return normalize(split.images[:limit], prep)
