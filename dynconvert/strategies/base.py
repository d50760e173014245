"""The contract between the pipeline and a strategy: what a new kind of dynamic network implements.

A strategy is a subclass of :class:`Strategy`, registered by name with
``@register_strategy``. The pipeline, the exporter, the CLI and the coverage check talk to it
only through the hooks below, so a new strategy is its own module(s) plus one import line in
``dynconvert/strategies/__init__.py``.

Required (abstract):

- ``prepare(models, recipe, example, num_classes, **replay)``: plan and insert; return an
  untrained :class:`~dynconvert.runtime.dynamic.DynamicModel`. ``replay`` is what the model's
  ``plan["replay"]`` recorded, so ``load`` rebuilds the same model.
- ``fit(dyn, data, prep, recipe, checkpointer)``: train what was inserted and calibrate the
  decisions; return the calibration record (``sweep``: the operating points tried, ``chosen``,
  ``budget_met``, ``calibration_static_accuracy``), as :func:`dynconvert.toolkit.choose.choose_point` makes it.
- ``sweep_on_split(dyn, split, prep, recipe, sweep)``: accuracy and FLOPs ratio of some points of
  the calibration sweep on another split (for the report's curve); the model is left as it was.
- ``open_all_(dyn)``: the "everything on" form, in place: no exit taken, every block kept,
  every sample to the last stage. The converted model then computes what the original did.
- ``take_all_(dyn)``: the opposite, in place: every decision that saves work is taken.

Optional:

- ``mixed_(dyn)``: a state between the two (for save/load checks); default: ``take_all_``.
- ``training_loss(dyn, images, labels)``: the loss of one training step as ``fit`` computes it,
  or None when nothing is trained.
- ``export_graph(dyn, example, form)``: a pure-tensor module for ONNX export returning
  ``(logits, decisions)``, with ``output_names``; default: not exportable.
- ``export_hint(recipe)``: a line the CLI logs before exporting; default none.
- ``min_models`` / ``max_models``: how many networks the strategy combines (default one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.options import describe_options, from_dict
from dynconvert.runtime.dynamic import DynamicModel


@dataclass
class NoOptions:
    """A strategy without options of its own."""


class Strategy(ABC):
    """A way to make a static network dynamic; an instance holds its validated options (``config``)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = NoOptions
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int] = 1

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.config_class()

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> Strategy:
        """The strategy with ``options`` (a recipe's ``options`` section) read and validated."""
        config = from_dict(cls.config_class, options or {}, where="options")
        if hasattr(config, "validate"):
            config.validate()
        return cls(config)

    @classmethod
    def check_models(cls, count: int) -> None:
        """Raise a ``DynconvertError`` unless the strategy combines ``count`` networks."""
        if not cls.min_models <= count <= cls.max_models:
            wanted = (
                str(cls.min_models) if cls.min_models == cls.max_models else f"{cls.min_models} to {cls.max_models}"
            )
            raise DynconvertError(f"strategy '{cls.name}' converts {wanted} model(s); the recipe names {count}")

    @classmethod
    def describe_options(cls) -> list[dict[str, Any]]:
        """The strategy's options: name, type, default and help text of each."""
        return describe_options(cls.config_class, "options.")

    @abstractmethod
    def prepare(
        self, models: list[nn.Module], recipe, example: torch.Tensor, num_classes: int, **replay
    ) -> DynamicModel:
        """Plan and insert; return the untrained dynamic model (``replay``: a saved plan)."""

    @abstractmethod
    def fit(self, dyn: DynamicModel, data, prep, recipe, checkpointer) -> dict:
        """Train the inserted parts and calibrate the decisions; return the calibration record."""

    @abstractmethod
    def sweep_on_split(self, dyn: DynamicModel, split, prep, recipe, sweep: list[dict]) -> list[dict]:
        """Accuracy and FLOPs ratio on ``split`` at points of the calibration ``sweep``."""

    @abstractmethod
    def open_all_(self, dyn: DynamicModel) -> DynamicModel:
        """In place: every decision set so that the model computes what the original did."""

    @abstractmethod
    def take_all_(self, dyn: DynamicModel) -> DynamicModel:
        """In place: every decision that saves work taken."""

    def mixed_(self, dyn: DynamicModel) -> DynamicModel:
        """In place: a state between :meth:`open_all_` and :meth:`take_all_`."""
        return self.take_all_(dyn)

    def training_loss(self, dyn: DynamicModel, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The loss of one training step of the inserted parts, or None when nothing is trained."""
        return None

    def export_graph(self, dyn: DynamicModel, example: torch.Tensor, form: str | None = None) -> nn.Module:
        """A pure-tensor ``forward(x) -> (logits, decisions)`` of ``dyn`` for ONNX export."""
        raise DynconvertError(f"strategy '{self.name}' has no ONNX export")

    def export_hint(self, recipe) -> str | None:
        """A line worth logging before an export of a model converted with ``recipe``."""
        return None
