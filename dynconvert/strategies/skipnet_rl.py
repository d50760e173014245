"""SkipNet's hybrid reinforcement-learning stage (Wang et al., ECCV 2018, section 3.3).

After the relaxed stage, the gates' decisions are sampled (no straight-through estimate) and the
gates learn by REINFORCE, each from its own return: the sample's reward for the prediction
(minus its cross-entropy) plus a skip reward for this gate and every later one that skipped. Our
change: a skipped block earns ``skip_reward`` times the fraction of the network's FLOPs it saves
(from the cost table), not a constant per gate. At the same time the supervised part of the
hybrid loss (cross-entropy + self-distillation) trains what the sampled network runs that is
trainable: the skip corrections, and the backbone modules of ``options.tune_backbone`` if any.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynconvert.runtime.block_skip import BlockSkipModel
from dynconvert.strategies import block_skip_common as common
from dynconvert.toolkit import distributed
from dynconvert.toolkit.checkpoint import Checkpointer
from dynconvert.toolkit.train import distillation_loss

STAGE = "hybrid RL"


def gate_returns(task_reward: torch.Tensor, kept: torch.Tensor, savings: torch.Tensor, skip_reward: float):
    """Each gate's return: the sample's task reward plus ``skip_reward`` x the FLOPs fraction saved
    by this gate and every later gate that skipped. Shapes: (batch,), (batch, blocks), (blocks,).

    Example: one sample, task reward -0.5, two gates that both skipped blocks saving 0.1 and 0.2
    of the FLOPs, ``skip_reward=1``: returns ``[[-0.2, -0.3]]``.
    """
    earned = (~kept).to(task_reward.dtype) * savings.to(task_reward.dtype) * skip_reward
    to_go = earned.flip(1).cumsum(1).flip(1)
    return task_reward[:, None] + to_go


def hybrid_rl_loss(
    dyn: BlockSkipModel, images, labels, teacher, train_config, skip_reward: float
) -> tuple[torch.Tensor, dict]:
    """One step's loss: REINFORCE on the gates (baseline: the batch mean of each gate's return)
    plus the supervised loss on the sampled network. Returns (loss, statistics)."""
    logits, log_probs, kept = dyn.forward_sampled(images)
    with torch.no_grad():
        savings = dyn.block_savings().to(images.device) / dyn.static_flops()
        task_reward = -F.cross_entropy(logits, labels, reduction="none")
        returns = gate_returns(task_reward, kept, savings, skip_reward)
        advantage = returns - returns.mean(0, keepdim=True)
        flops_ratio = (dyn.sample_flops(kept) / dyn.static_flops()).float().mean()
    policy_loss = -(advantage * log_probs).sum(1).mean()
    supervised = distillation_loss(
        logits, labels, teacher, train_config.distill_temperature, train_config.distill_weight
    )
    stats = {"accuracy": float((logits.argmax(1) == labels).float().mean()), "flops_ratio": float(flops_ratio)}
    return policy_loss + supervised, stats


def train_hybrid_rl(
    dyn: BlockSkipModel,
    data,
    prep,
    recipe,
    epochs: int,
    skip_reward: float,
    checkpointer: Checkpointer | None = None,
    tune: tuple[str, ...] = (),
    backbone_lr: float = 0.0,
) -> list[dict]:
    """``epochs`` epochs of the hybrid RL stage (AdamW at ``train.lr / 10``, cosine schedule);
    returns one record per epoch. ``checkpointer`` saves at every epoch end and restores on resume."""
    cfg = recipe.train
    checkpointer = checkpointer or Checkpointer.disabled()
    if epochs <= 0:
        return []
    inserted, backbone_params = common.trainable_parts(dyn, list(tune))
    teacher = common.teacher_logits(dyn, data.fit, prep, recipe, checkpointer)
    dyn.dyn.controller.train()
    optimizer, scheduler, params = common.adamw_with_cosine(
        inserted, backbone_params, cfg.lr / 10, cfg, epochs, len(data.fit), backbone_lr
    )
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    progress = checkpointer.begin(STAGE, epochs, dyn, optimizer, scheduler, generator)

    def step(images, labels, index):
        return hybrid_rl_loss(dyn, images, labels, teacher[index].to(images.device), cfg, skip_reward)

    # a gate that every sample of a rank's share follows one way leaves a block without gradient
    step = distributed.wrap_step(params, step, find_unused=True)
    common.run_epochs(step, optimizer, scheduler, progress, checkpointer, data, prep, recipe, epochs, generator, STAGE)
    for param in backbone_params:
        param.requires_grad_(False)
    distributed.broadcast_buffers(dyn.dyn.controller)
    dyn.eval()
    return progress.history
