"""SkipNet / ConvNet-AIG: a gate before each residual block decides whether it runs.

prepare: cut the network into units, find the droppable ones (``shortcut(x) + residual(x)``),
build each one's skipped form, insert gates (feed-forward per block, or one recurrent gate).
fit: relaxed training (straight-through, Gumbel noise, cost term towards a FLOPs target,
self-distillation) of the gates and the skip corrections with the backbone frozen, optionally
SkipNet's hybrid RL stage (``skipnet_rl.py``), then one bias on every gate calibrated to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynconvert.options import check_choice, check_range, option
from dynconvert.runtime.gates import GATE_KINDS
from dynconvert.strategies import block_skip_common as common
from dynconvert.strategies.block_skip_base import BlockSkipStrategy
from dynconvert.strategies.block_skip_common import SKIP_CORRECTIONS
from dynconvert.strategies.registry import register_strategy
from dynconvert.strategies.skipnet_rl import train_hybrid_rl


@dataclass
class SkipNetConfig:
    """Gate kind and size, the training FLOPs target, what a skipped block leaves in its place
    (``skip_correction``: ``linear``, a learned per-position linear map of the shortcut, or
    ``none``, the shortcut alone), the optional hybrid RL stage (``rl_epochs`` > 0; a skipped
    block earns ``rl_skip_reward`` x its share of the FLOPs), whether blocks whose gate decides the
    same for every calibration image are fixed that way (``settle``: their gates no longer run),
    how many calibration rounds sweep again with the blocks fixed that the chosen point never
    varies (``refine_rounds``, see ``block_skip_common.calibrate_bias``), and blocks never to skip."""

    gate: str = option("feedforward", "feedforward (one gate per block) or recurrent (one shared gate)")
    gate_hidden: int = option(16, "hidden width of a gate")
    gate_pool: int = option(1, "side of the pooling of a block's input before its gate")
    target_flops_ratio: float = option(0.6, "the FLOPs ratio the training cost term pulls towards")
    cost_weight: float = option(30.0, "weight of the squared distance to target_flops_ratio in the loss")
    skip_correction: str = option("linear", "what a skipped block leaves: linear (a learned map) or none")
    rl_epochs: int = option(0, "epochs of SkipNet's hybrid RL stage after the relaxed training (0: off)")
    rl_skip_reward: float = option(0.5, "hybrid RL: reward of a skipped block per share of the FLOPs")
    settle: bool = option(True, "fix the blocks whose gate never varies on the calibration images")
    refine_rounds: int = option(
        0, "calibration rounds that fix the blocks the chosen point never varies and sweep again (0: off)"
    )
    exclude: list[str] = option([], "blocks never to skip (module names)")
    calibration_offsets: list[float] = option(
        [-2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
        "offsets on every keep-logit tried by calibration",
    )
    tune_backbone: list[str] = option([], "backbone module name prefixes trained with the gates (empty: frozen)")
    backbone_lr: float = option(1e-4, "learning rate of the tuned backbone modules")

    def validate(self) -> None:
        check_choice("options.gate", self.gate, tuple(GATE_KINDS))
        check_range("options.gate_hidden", self.gate_hidden, 1, None)
        check_range("options.gate_pool", self.gate_pool, 1, None)
        check_range("options.target_flops_ratio", self.target_flops_ratio, 0.0, 1.0)
        check_range("options.cost_weight", self.cost_weight, 0.0, None)
        check_choice("options.skip_correction", self.skip_correction, SKIP_CORRECTIONS)
        check_range("options.rl_epochs", self.rl_epochs, 0, None)
        check_range("options.rl_skip_reward", self.rl_skip_reward, 0.0, None)
        check_range("options.backbone_lr", self.backbone_lr, 0.0, None)
        check_range("options.refine_rounds", self.refine_rounds, 0, None)


@register_strategy
class SkipNet(BlockSkipStrategy):
    """Per-block gates on the block input."""

    name = "skipnet"
    config_class = SkipNetConfig

    def prepare(self, models, recipe, example, num_classes, blocks=None, settled=None, tuned=None):
        (model,), config = models, self.config
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

    def fit(self, dyn, data, prep, recipe, checkpointer=None) -> dict:
        config = self.config
        static_logits = None
        if config.tune_backbone:
            # the budget is measured against the original network; the tuned units become copies
            static_logits = common.teacher_logits(dyn, data.calibration, prep, recipe)
            tuned = common.tunable_units(dyn, config.tune_backbone, "options.tune_backbone")
            common.own_tuned_units(dyn, tuned)
            dyn.plan["replay"]["tuned"] = tuned
        history = common.train_relaxed(
            dyn,
            data,
            prep,
            recipe,
            config.target_flops_ratio,
            config.cost_weight,
            config.tune_backbone,
            checkpointer,
            config.backbone_lr,
        )
        history += train_hybrid_rl(
            dyn,
            data,
            prep,
            recipe,
            config.rl_epochs,
            config.rl_skip_reward,
            checkpointer,
            config.tune_backbone,
            config.backbone_lr,
        )
        calibration = common.calibrate_bias(
            dyn, data.calibration, prep, recipe, config.calibration_offsets, static_logits, config.refine_rounds
        )
        if config.settle:
            calibration["settled"] = common.settle_constant_decisions(dyn, data.calibration, prep, recipe)
        return {"train": history, **calibration}

    def training_loss(self, dyn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Straight-through gates with the cost term towards ``target_flops_ratio`` (no distillation)."""
        logits, probs = dyn.forward_relaxed(images)
        cost = common.expected_flops_ratio(dyn, probs)
        return F.cross_entropy(logits, labels) + self.config.cost_weight * (cost - self.config.target_flops_ratio) ** 2
