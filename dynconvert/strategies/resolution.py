"""Resolution cascade (resolution-adaptive networks, RANet): one model run at a few input
sizes, smallest first; an image is run again at a larger size only while the model is unsure.

The model and everything after ``prepare`` are the model cascade's (``strategies/cascade``):
each stage is the same network behind an adapter that resizes the reference input (the
model's native size) to the stage's size, and the thresholds come from the same sweep and
chooser against the most accurate size alone. The report marks each size alone on its curve,
so "a smaller input suffices for these images" is not mistaken for the cascade's gain.

Resizing: the reference input is the image prepared once at the native size, and a stage
shrinks it with an antialiased filter, which approximates resizing the original image
(docs/strategies.md gives the measured difference); one input keeps the model one graph.

BatchNorm: a network trained at one size sees other statistics at another. With
``batchnorm_images`` each smaller size gets its own copy of the model whose BatchNorm
statistics are re-estimated on training images at that size (the weights stay shared); the
statistics are part of the inserted state, so a saved conversion keeps them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch import nn

from dynconvert.errors import DynconvertError, NotApplicable
from dynconvert.options import check_range, option
from dynconvert.progress import progress_bar
from dynconvert.strategies.cascade.model import CascadeModel
from dynconvert.strategies.cascade.strategy import Cascade, CascadeConfig, build_stage
from dynconvert.strategies.registry import register_strategy
from dynconvert.toolkit.data import Preprocess, stratified_sample
from dynconvert.toolkit.train import batches

log = logging.getLogger(__name__)


@dataclass
class ResolutionConfig(CascadeConfig):
    """The input sizes, how the stages decide (as the model cascade's), and BatchNorm per size."""

    scales: list[float] = option(
        [0.5, 0.75, 1.0], "input sizes as fractions of the model's native size, ascending; the last is usually 1.0"
    )
    batchnorm_images: int = option(
        0, "re-estimate BatchNorm statistics for each smaller size on this many training images (0: off)"
    )

    def validate(self) -> None:
        super().validate()
        if len(self.scales) < 2:
            raise DynconvertError("recipe key 'options.scales' must name at least two sizes, e.g. [0.5, 1.0]")
        for scale in self.scales:
            check_range("options.scales", scale, 0.05, 4.0)
        if sorted(self.scales) != list(self.scales):
            raise DynconvertError(f"recipe key 'options.scales' must ascend (cheapest first), got {self.scales}")
        check_range("options.batchnorm_images", self.batchnorm_images, 0, None)


class ResolutionModel(CascadeModel):
    """A cascade of one model at several sizes; stages with their own BatchNorm statistics keep
    them in the inserted state as ``dyn.batchnorm.s<stage>_<layer>_{mean,var}``."""

    def __init__(self, stages, stage_flops, criterion, own_batchnorm: dict[int, nn.Module]):
        super().__init__(stages, stage_flops, criterion)
        self.own_batchnorm = sorted(own_batchnorm)
        self.dyn.batchnorm = nn.Module()
        for k, twin in own_batchnorm.items():
            for name, layer in batchnorm_layers(twin):
                key = f"s{k}_{name.replace('.', '_')}"
                self.dyn.batchnorm.register_buffer(f"{key}_mean", layer.running_mean.detach().clone())
                self.dyn.batchnorm.register_buffer(f"{key}_var", layer.running_var.detach().clone())

    def _pairs(self):
        """(stage's BatchNorm layer, its stored mean, its stored var) for every stage with its own."""
        stored = self.dyn.batchnorm
        for k in self.own_batchnorm:
            for name, layer in batchnorm_layers(self.stages[k]):
                key = f"s{k}_{name.split('.', 1)[1].replace('.', '_')}"  # past the adapter's Sequential index
                yield layer, getattr(stored, f"{key}_mean"), getattr(stored, f"{key}_var")

    @torch.no_grad()
    def store_batchnorm(self) -> None:
        """Copy the stages' re-estimated statistics into the inserted state."""
        for layer, mean, var in self._pairs():
            mean.copy_(layer.running_mean)
            var.copy_(layer.running_var)

    @torch.no_grad()
    def load_inserted_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        missing, unexpected = super().load_inserted_state(state)
        if not missing and not unexpected:
            for layer, mean, var in self._pairs():
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
        return missing, unexpected


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BatchNorm layers of ``model`` with their names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def twin_with_own_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing its parameters but holding its own buffers (BatchNorm statistics)."""
    twin = copy.deepcopy(model)
    originals = dict(model.named_parameters())
    for name, _ in list(twin.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner) if owner else twin, leaf, originals[name])
    return twin


@torch.no_grad()
def reestimate_batchnorm(stage: nn.Module, split, prep: Preprocess, batch_size: int, device: str, desc: str) -> None:
    """Replace the BatchNorm statistics of ``stage`` by the average of their values over the
    batches of ``split`` (each batch counts the same, as in training; everything else in
    evaluation mode: no dropout, no stochastic depth)."""
    layers = [layer for _, layer in batchnorm_layers(stage)]
    momenta = [layer.momentum for layer in layers]
    stage.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
        layer.train()
    try:
        with progress_bar(total=len(split), desc=desc, unit="img", mininterval=1.0) as bar:
            for images, _, _ in batches(split, prep, batch_size, device):
                stage(images)
                bar.update(len(images))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        stage.eval()


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
        if max(self.config.scales) > 1.0:
            log.warning("resolution: sizes above the native one enlarge the prepared input, adding no detail")
        reference = Preprocess.from_model(model)
        reference.input_size = tuple(example.shape[1:])
        height, width = reference.input_size[1:]
        own_batchnorm = self.config.batchnorm_images > 0 and bool(batchnorm_layers(model))
        stages, flops, sizes, twins = [], [], [], {}
        for k, scale in enumerate(self.config.scales):
            size = (max(8, round(height * scale)), max(8, round(width * scale)))
            own = size != (height, width) and own_batchnorm
            network = twin_with_own_batchnorm(model) if own else model
            try:
                stage, size, cost = build_stage(network, reference, reference, size, example)
            except (RuntimeError, AssertionError, ValueError) as exc:
                problem = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
                raise NotApplicable(
                    f"the model takes one input size only: it does not run at {size[0]}x{size[1]} ({problem}); "
                    "a resolution cascade needs a network that accepts other input sizes, such as a CNN "
                    "(a vision transformer is built for one img_size)"
                ) from None
            if own:
                twins[k] = network
            stages.append(stage)
            flops.append(cost)
            sizes.append(size)
        name = recipe.model_configs()[0].name
        dyn = ResolutionModel(stages, flops, recipe.calibrate.criterion, twins)
        dyn.plan = {
            "replay": {},
            "insertion": "none: the model at several input sizes",
            "models": [f"{name} at {h}x{w}" for h, w in sizes],
            "stage_flops": flops,
            "stage_input_sizes": sizes,
            "own_batchnorm_stages": sorted(twins),
        }
        return dyn.eval()

    def fit(self, dyn: ResolutionModel, data, prep, recipe, checkpointer=None) -> dict:
        """BatchNorm statistics per size (when asked), then the model cascade's calibration."""
        if dyn.own_batchnorm:
            count = min(self.config.batchnorm_images, len(data.fit))
            split = data.fit.subset(stratified_sample(data.fit.labels, count, recipe.seed), "batchnorm")
            for k in dyn.own_batchnorm:
                size = "x".join(map(str, dyn.plan["stage_input_sizes"][k]))
                reestimate_batchnorm(
                    dyn.stages[k], split, prep, recipe.data.batch_size, recipe.device, f"batchnorm {size}"
                )
            dyn.store_batchnorm()
        record = super().fit(dyn, data, prep, recipe, checkpointer)
        record["batchnorm_images"] = count if dyn.own_batchnorm else 0
        return record
