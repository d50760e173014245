"""Resolution cascade (resolution-adaptive networks, RANet): one model run at a few input
sizes, smallest first; an image is run again at a larger size only while the model is unsure.

The model and everything after ``prepare`` are the model cascade's (``strategies/cascade``):
each stage is the same network behind an adapter that resizes the reference input (the
model's native size) to the stage's size, and the thresholds come from the same sweep and
chooser against the native size alone. The report marks each size alone on its curve, so
"a smaller input suffices for these images" is not mistaken for the cascade's gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.options import check_range, option
from dynconvert.strategies.cascade.model import CascadeModel, InputAdapter
from dynconvert.strategies.cascade.strategy import Cascade, CascadeConfig
from dynconvert.strategies.registry import register_strategy
from dynconvert.toolkit.costs import count_flops
from dynconvert.toolkit.data import Preprocess


@dataclass
class ResolutionConfig(CascadeConfig):
    """The input sizes, and how the stages decide (as the model cascade's)."""

    scales: list[float] = option(
        [0.5, 0.75, 1.0], "input sizes as fractions of the model's native size, ascending; the last is usually 1.0"
    )

    def validate(self) -> None:
        super().validate()
        if len(self.scales) < 2:
            raise DynconvertError("recipe key 'options.scales' must name at least two sizes, e.g. [0.5, 1.0]")
        for scale in self.scales:
            check_range("options.scales", scale, 0.05, 4.0)
        if sorted(self.scales) != list(self.scales):
            raise DynconvertError(f"recipe key 'options.scales' must ascend (cheapest first), got {self.scales}")


@register_strategy
class Resolution(Cascade):
    """One model at several input sizes, smallest first."""

    name = "resolution"
    config_class = ResolutionConfig
    min_models = 1
    max_models = 1

    def prepare(self, models, recipe, example, num_classes, **replay) -> CascadeModel:
        """The model behind a resizing adapter per size; FLOPs per size counted on ``example``."""
        (model,) = models
        if example.device.type == "cpu" and example.dim() == 4:
            # on a CPU, convolutions run markedly faster in channels-last, and every stage runs the
            # whole network: the layout is the model's own, so the reference runs the same way
            model.to(memory_format=torch.channels_last)
        reference = Preprocess.from_model(model)
        reference.input_size = tuple(example.shape[1:])
        height, width = reference.input_size[1:]
        stages, flops, sizes = [], [], []
        for scale in self.config.scales:
            size = (max(8, round(height * scale)), max(8, round(width * scale)))
            adapter = InputAdapter(reference, reference, size)
            stage = model.eval() if adapter.is_identity else nn.Sequential(adapter, model.eval())
            stages.append(stage)
            flops.append(count_flops(stage, example[:1]))
            sizes.append(list(size))
        name = recipe.model_configs()[0].name
        dyn = CascadeModel(stages, flops, recipe.calibrate.criterion)
        dyn.plan = {
            "replay": {},
            "insertion": "none: the model at several input sizes",
            "models": [f"{name} at {h}x{w}" for h, w in sizes],
            "stage_flops": flops,
            "stage_input_sizes": sizes,
        }
        return dyn.eval()
