"""SkipNet / ConvNet-AIG: a gate before each residual block decides whether it runs.

prepare: cut the network into units, find the droppable ones (``shortcut(x) + residual(x)``),
build each one's skipped form, insert gates (feed-forward per block, or one recurrent gate).
fit: relaxed training (straight-through, Gumbel noise, cost term towards a FLOPs target,
self-distillation) of the gates and the skip corrections with the backbone frozen, optionally
SkipNet's hybrid RL stage (``skipnet_rl.py``), then one bias on every gate calibrated to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynconvert.recipe import _check_choice, _check_range
from dynconvert.runtime.gates import GATE_KINDS
from dynconvert.strategies import block_skip_common as common
from dynconvert.strategies.block_skip_common import SKIP_CORRECTIONS
from dynconvert.strategies.registry import Strategy, register_strategy
from dynconvert.strategies.skipnet_rl import train_hybrid_rl


@dataclass
class SkipNetConfig:
    """Gate kind and size, the training FLOPs target, what a skipped block leaves in its place
    (``skip_correction``: ``linear``, a learned per-position linear map of the shortcut, or
    ``none``, the shortcut alone), the optional hybrid RL stage (``rl_epochs`` > 0; a skipped
    block earns ``rl_skip_reward`` x its share of the FLOPs), whether blocks whose gate decides the
    same for every calibration image are fixed that way (``settle``: their gates no longer run),
    and blocks never to skip."""

    gate: str = "feedforward"
    gate_hidden: int = 16
    gate_pool: int = 1
    target_flops_ratio: float = 0.6
    cost_weight: float = 30.0
    skip_correction: str = "linear"
    rl_epochs: int = 0
    rl_skip_reward: float = 0.5
    settle: bool = True
    exclude: list[str] = field(default_factory=list)
    calibration_offsets: list[float] = field(
        default_factory=lambda: [-2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    )

    def validate(self) -> None:
        _check_choice("options.gate", self.gate, tuple(GATE_KINDS))
        _check_range("options.gate_hidden", self.gate_hidden, 1, None)
        _check_range("options.gate_pool", self.gate_pool, 1, None)
        _check_range("options.target_flops_ratio", self.target_flops_ratio, 0.0, 1.0)
        _check_range("options.cost_weight", self.cost_weight, 0.0, None)
        _check_choice("options.skip_correction", self.skip_correction, SKIP_CORRECTIONS)
        _check_range("options.rl_epochs", self.rl_epochs, 0, None)
        _check_range("options.rl_skip_reward", self.rl_skip_reward, 0.0, None)


@register_strategy
class SkipNet(Strategy):
    """Per-block gates on the block input."""

    name = "skipnet"
    config_class = SkipNetConfig

    @staticmethod
    def prepare(model, recipe, config: SkipNetConfig, example, num_classes, blocks=None, settled=None, tuned=None):
        gm, units = common.plan_units(model, recipe, example, config.exclude, blocks)
        gate_class = GATE_KINDS[config.gate]
        dyn = common.build_block_skip_model(
            gm,
            units,
            example,
            lambda shapes: gate_class(shapes, hidden=config.gate_hidden, pool=config.gate_pool),
            config.skip_correction,
            settled,
        )
        if tuned:
            common.own_tuned_units(dyn, tuned)
            dyn.plan["replay"]["tuned"] = sorted(set(tuned))
        return dyn

    @staticmethod
    def fit(dyn, data, prep, recipe, config: SkipNetConfig, checkpointer=None) -> dict:
        static_logits = None
        if recipe.train.tune_backbone:
            # the budget is measured against the original network; the tuned units become copies
            static_logits = common.teacher_logits(dyn, data.calibration, prep, recipe)
            tuned = common.tunable_units(dyn, recipe.train.tune_backbone, "train.tune_backbone")
            common.own_tuned_units(dyn, tuned)
            dyn.plan["replay"]["tuned"] = tuned
        history = common.train_relaxed(
            dyn,
            data,
            prep,
            recipe,
            config.target_flops_ratio,
            config.cost_weight,
            recipe.train.tune_backbone,
            checkpointer,
        )
        history += train_hybrid_rl(dyn, data, prep, recipe, config.rl_epochs, config.rl_skip_reward, checkpointer)
        calibration = common.calibrate_bias(
            dyn, data.calibration, prep, recipe, config.calibration_offsets, static_logits
        )
        if config.settle:
            calibration["settled"] = common.settle_constant_decisions(dyn, data.calibration, prep, recipe)
        return {"train": history, **calibration}

    @staticmethod
    def sweep_on_split(dyn, split, prep, recipe, sweep):
        return common.sweep_points_on_split(dyn, split, prep, recipe, sweep)
