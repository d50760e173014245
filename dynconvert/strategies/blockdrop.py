"""BlockDrop (Wu, Nagarajan et al., CVPR 2018): a policy network looks once at a downsampled
image and decides which residual blocks run.

prepare: the same droppable blocks as SkipNet, one :class:`PolicyNetwork` as the controller.
fit: REINFORCE with a self-critical baseline and a curriculum (the last blocks first), backbone
frozen; optionally joint fine-tuning of policy and backbone; then one bias on every keep-logit
calibrated to the budget. The training loops live in ``blockdrop_training``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynconvert.errors import DynconvertError
from dynconvert.options import check_choice, check_range, option
from dynconvert.runtime.policy import STEM_STRIDES, PolicyNetwork
from dynconvert.strategies import block_skip_common as common
from dynconvert.strategies.block_skip_base import BlockSkipStrategy
from dynconvert.strategies.blockdrop_training import (
    decided_mask,
    finetune_jointly,
    fit_corrections,
    reinforce_step,
    train_policy,
)
from dynconvert.strategies.registry import register_strategy


@dataclass
class BlockDropConfig:
    """Policy network, reward, curriculum and joint fine-tuning of BlockDrop.

    ``input_size``/``widths``/``stem_stride``: the policy network (see ``PolicyNetwork``).
    ``gamma``: penalty (reward ``-gamma``) for a wrong prediction. ``alpha``: probability
    bounding, ``p -> alpha * p + (1 - alpha) * (1 - p)``. ``beta``: entropy bonus.
    ``curriculum_stage_steps``: training steps per curriculum stage (0: one stage per epoch).
    ``curriculum_blocks_per_stage``: blocks the policy takes over per stage, at least (more
    where needed to decide every block by the last stage; 0: just that many). ``finetune_epochs``/``finetune_lr``/
    ``finetune_modules``: joint fine-tuning (0 epochs: off; policy learning rate; backbone
    module name prefixes to tune, empty: all; their learning rate is ``backbone_lr``).
    ``skip_correction``: what a dropped block leaves in its place: ``linear``, a learned
    per-position linear map of the shortcut (trained by self-distillation while the policy
    learns), or ``none``, the shortcut alone. ``correction_epochs``/``correction_flops_ratio``/
    ``correction_lr``: after the policy has learned, fit the corrections to its greedy decisions
    at the offset where they cost that FLOPs ratio (0 epochs: off); the calibration sweep then
    also tries offsets around that one. ``settle``: after calibration, blocks the policy keeps
    for every calibration image, or for none, are fixed that way (no per-block decision at run
    time; the policy still runs for the others), as SkipNet does. ``refine_rounds``: calibration
    rounds that fix the blocks the chosen point never varies and sweep the offsets again over the
    others (``block_skip_common.calibrate_bias``).
    """

    input_size: int = option(16, "side of the downsampled image the policy sees")
    widths: list[int] = option([16, 32, 64], "channels of the policy's residual stages")
    stem_stride: int = option(1, "stride of the policy's stem")
    gamma: float = option(5.0, "penalty (reward -gamma) of a wrong prediction")
    alpha: float = option(0.8, "probability bounding: p -> alpha p + (1 - alpha)(1 - p)")
    beta: float = option(0.1, "entropy bonus")
    curriculum: bool = option(True, "hand the blocks to the policy from the last backwards")
    curriculum_stage_steps: int = option(0, "training steps per curriculum stage (0: one stage per epoch)")
    curriculum_blocks_per_stage: int = option(0, "blocks the policy takes over per stage, at least")
    finetune_epochs: int = option(0, "epochs of joint fine-tuning of policy and backbone (0: off)")
    finetune_lr: float = option(1e-4, "policy learning rate during joint fine-tuning")
    finetune_modules: list[str] = option([], "backbone module name prefixes fine-tuned (empty: all)")
    backbone_lr: float = option(1e-4, "learning rate of the fine-tuned backbone modules")
    skip_correction: str = option("linear", "what a dropped block leaves: linear (a learned map) or none")
    correction_epochs: int = option(0, "epochs fitting the corrections to the greedy policy (0: off)")
    correction_flops_ratio: float = option(0.65, "the FLOPs ratio at which the corrections are fitted")
    correction_lr: float = option(3e-3, "learning rate of the corrections")
    settle: bool = option(True, "fix the blocks the policy never varies on the calibration images")
    refine_rounds: int = option(
        0, "calibration rounds that fix the blocks the chosen point never varies and sweep again (0: off)"
    )
    exclude: list[str] = option([], "blocks never to skip (module names)")
    calibration_offsets: list[float] = option(
        [-2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0],
        "offsets on every keep-logit tried by calibration",
    )

    def validate(self) -> None:
        check_range("options.input_size", self.input_size, 4, None)
        check_choice("options.skip_correction", self.skip_correction, common.SKIP_CORRECTIONS)
        if not self.widths:
            raise DynconvertError("recipe key 'options.widths' must name at least one width")
        for width in self.widths:
            check_range("options.widths", width, 1, None)
        if self.stem_stride not in STEM_STRIDES:
            raise DynconvertError(
                f"recipe key 'options.stem_stride' must be one of {', '.join(map(str, STEM_STRIDES))}, "
                f"got {self.stem_stride}"
            )
        check_range("options.gamma", self.gamma, 0.0, None)
        check_range("options.alpha", self.alpha, 0.5, 1.0)
        check_range("options.beta", self.beta, 0.0, None)
        check_range("options.curriculum_stage_steps", self.curriculum_stage_steps, 0, None)
        check_range("options.curriculum_blocks_per_stage", self.curriculum_blocks_per_stage, 0, None)
        check_range("options.finetune_epochs", self.finetune_epochs, 0, None)
        check_range("options.finetune_lr", self.finetune_lr, 0.0, None)
        check_range("options.backbone_lr", self.backbone_lr, 0.0, None)
        check_range("options.refine_rounds", self.refine_rounds, 0, None)
        check_range("options.correction_epochs", self.correction_epochs, 0, None)
        check_range("options.correction_flops_ratio", self.correction_flops_ratio, 0.0, 1.0)
        check_range("options.correction_lr", self.correction_lr, 0.0, None)
        if self.correction_epochs and self.skip_correction == "none":
            raise DynconvertError(
                "options.correction_epochs fits skip corrections, but options.skip_correction is 'none'; "
                "set options.skip_correction: linear or options.correction_epochs: 0"
            )


# offsets tried around the one the corrections were fitted at: they fit best near it
FINE_OFFSET_STEPS = (-0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3)


@register_strategy
class BlockDrop(BlockSkipStrategy):
    """A policy network decides, from the downsampled image, which residual blocks run."""

    name = "blockdrop"
    config_class = BlockDropConfig

    def prepare(self, models, recipe, example, num_classes, blocks=None, settled=None, tuned=None):
        (model,), config = models, self.config
        gm, units = common.plan_units(model, recipe, example, config.exclude, blocks)

        def make_policy(shapes):
            return PolicyNetwork(
                len(shapes),
                in_channels=example.shape[1],
                input_size=config.input_size,
                widths=config.widths,
                stem_stride=config.stem_stride,
            ).eval()

        dyn = common.build_block_skip_model(gm, units, example, make_policy, config.skip_correction, settled)
        if tuned:
            common.own_tuned_units(dyn, tuned)
            dyn.plan["replay"]["tuned"] = sorted(set(tuned))
        return dyn

    def fit(self, dyn, data, prep, recipe, checkpointer=None) -> dict:
        config = self.config
        history = train_policy(dyn, data, prep, recipe, config, checkpointer)
        offsets = list(config.calibration_offsets)
        if config.correction_epochs > 0:
            fitted, offset = fit_corrections(dyn, data, prep, recipe, config, checkpointer)
            history += fitted
            offsets = sorted({*offsets, *(offset + step for step in FINE_OFFSET_STEPS)})
        static_logits = None
        if config.finetune_epochs > 0:
            # the budget is measured against the original network, which fine-tuning changes
            static_logits = common.teacher_logits(dyn, data.calibration, prep, recipe)
            history += finetune_jointly(dyn, data, prep, recipe, config, checkpointer)
        calibration = common.calibrate_bias(
            dyn, data.calibration, prep, recipe, offsets, static_logits, config.refine_rounds
        )
        if config.settle:
            calibration["settled"] = common.settle_constant_decisions(dyn, data.calibration, prep, recipe)
        return {"train": history, **calibration}

    def training_loss(self, dyn, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """REINFORCE with the self-critical baseline, every block decided by the policy."""
        mask = decided_mask(dyn.num_blocks, dyn.num_blocks, images.device)
        loss, _, _ = reinforce_step(dyn, images, labels, self.config, mask)
        return loss
