"""BlockDrop's training loops: curriculum policy learning with the backbone frozen, then
optional joint fine-tuning of policy and backbone.

Both use REINFORCE with a self-critical baseline: actions are sampled from the bounded keep
probabilities, the network runs with them (skipped blocks really skipped, see
``BlockSkipModel.route_with``), and the advantage over the greedy policy (keep where
``p >= 0.5``) weighs the log-probability of the sample.
"""

from __future__ import annotations

import math

import torch

from dynconvert.runtime.block_skip import BlockSkipModel
from dynconvert.strategies import block_skip_common as common
from dynconvert.toolkit import distributed
from dynconvert.toolkit.checkpoint import Checkpointer
from dynconvert.toolkit.stage_loop import means
from dynconvert.toolkit.train import distillation_loss, map_batches


def bounded_probs(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """Keep probabilities bounded away from 0 and 1: ``alpha * p + (1 - alpha) * (1 - p)``."""
    p = torch.sigmoid(logits)
    return alpha * p + (1.0 - alpha) * (1.0 - p)


def blockdrop_reward(correct: torch.Tensor, flops_ratio: torch.Tensor, gamma: float) -> torch.Tensor:
    """BlockDrop's reward: ``1 - flops_ratio^2`` for a correct prediction, ``-gamma`` otherwise.

    Example: ``blockdrop_reward(torch.tensor([True, False]), torch.tensor([0.5, 0.5]), 5.0)``
    is ``[0.75, -5.0]``.
    """
    ratio = flops_ratio.float()
    return torch.where(correct, 1.0 - ratio**2, torch.full_like(ratio, -gamma))


def curriculum_schedule(num_blocks: int, stages: int, per_stage: int = 0) -> list[int]:
    """How many blocks (the last ones) the policy decides at each curriculum stage.

    At least ``per_stage`` blocks are added per stage, and more where needed to decide every
    block by the last stage (0: just that many). Example: ``curriculum_schedule(9, 3)`` is
    ``[3, 6, 9]``, ``curriculum_schedule(4, 6, per_stage=1)`` is ``[1, 2, 3, 4, 4, 4]``.
    """
    stages = max(1, stages)
    per_stage = max(per_stage, math.ceil(num_blocks / stages))
    return [min(num_blocks, (stage + 1) * per_stage) for stage in range(stages)]


def decided_mask(num_blocks: int, decided: int, device=None) -> torch.Tensor:
    """Bool ``(num_blocks,)``: True for the last ``decided`` blocks (the others are forced on)."""
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    if decided > 0:
        mask[num_blocks - min(decided, num_blocks) :] = True
    return mask


def reinforce_step(
    dyn: BlockSkipModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    config,
    mask: torch.Tensor,
    backbone_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One REINFORCE step's loss for the policy; blocks outside ``mask`` are forced on.

    Returns (policy loss, logits of the network run with the sampled actions, statistics).
    With ``backbone_grad`` those logits carry gradients into the backbone (joint
    fine-tuning); otherwise both backbone passes run under ``torch.no_grad``.
    """
    logits = dyn.dyn.controller.start(images) + dyn.dyn.bias
    probs = bounded_probs(logits, config.alpha)
    dist = torch.distributions.Bernoulli(probs=probs)
    with torch.no_grad():
        sample = dist.sample().bool() | ~mask
        greedy = (logits >= 0) | ~mask
    if backbone_grad:
        out = dyn.route_with(images, sample).logits
        with torch.no_grad():
            greedy_out = dyn.route_with(images, greedy).logits
    else:
        with torch.no_grad():  # one pass over both action sets: bigger sub-batches per block
            both = dyn.route_with(torch.cat([images, images]), torch.cat([sample, greedy])).logits
            out, greedy_out = both.split(len(images))
    with torch.no_grad():
        static = dyn.static_flops()
        ratio = (dyn.sample_flops(sample) / static).float().to(images.device)
        greedy_ratio = (dyn.sample_flops(greedy) / static).float().to(images.device)
        correct = out.argmax(1) == labels
        reward = blockdrop_reward(correct, ratio, config.gamma)
        advantage = reward - blockdrop_reward(greedy_out.argmax(1) == labels, greedy_ratio, config.gamma)
    maskf = mask.to(probs.dtype)
    log_prob = (dist.log_prob(sample.to(probs.dtype)) * maskf).sum(1)
    entropy = (dist.entropy() * maskf).sum(1)
    loss = -(advantage * log_prob).mean() - config.beta * entropy.mean()
    stats = {
        "reward": float(reward.mean()),
        "accuracy": float(correct.float().mean()),
        "flops_ratio": float(ratio.mean()),
        "greedy_flops_ratio": float(greedy_ratio.mean()),
    }
    return loss, out, stats


def train_policy(
    dyn: BlockSkipModel, data, prep, recipe, config, checkpointer: Checkpointer | None = None
) -> list[dict]:
    """Curriculum policy learning, backbone frozen: at stage t only the last blocks of
    ``curriculum_schedule`` are decided by the policy, the earlier ones kept. Skip corrections,
    where the model has them, learn at the same time by self-distillation on the sampled runs.

    Adam at ``train.lr`` (constant, as in the paper) for ``train.epochs`` epochs of
    ``train.batch_size``; returns one record per epoch. ``checkpointer`` saves the state
    (curriculum position included) at every epoch end and restores it when resuming.
    """
    cfg = recipe.train
    checkpointer = checkpointer or Checkpointer.disabled()
    params, _ = common.trainable_parts(dyn, [])  # the policy and the skip corrections, if any
    corrections = hasattr(dyn.dyn, "corrections")
    steps_per_epoch = math.ceil(len(data.fit) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if total == 0:
        return []
    stage_steps = config.curriculum_stage_steps or steps_per_epoch
    stages = math.ceil(total / stage_steps)
    k = dyn.num_blocks
    schedule = curriculum_schedule(k, stages, config.curriculum_blocks_per_stage) if config.curriculum else [k]
    controller = dyn.dyn.controller
    controller.train()
    teacher = common.teacher_logits(dyn, data.fit, prep, recipe, checkpointer) if corrections else None
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    progress = checkpointer.begin("policy", cfg.epochs, dyn, optimizer, None, generator)

    def step(images, labels, mask, index):
        # the corrections learn, by self-distillation, to stand in for the blocks the sampled policy drops
        loss, out, stats = reinforce_step(dyn, images, labels, config, mask, backbone_grad=corrections)
        if corrections:
            target = teacher[index].to(images.device)
            loss = loss + distillation_loss(out, labels, target, cfg.distill_temperature, cfg.distill_weight)
        return loss, out, stats

    step = distributed.wrap_step(params, step, find_unused=corrections)

    def decided_at(step_index: int) -> int:
        return schedule[min(step_index // stage_steps, len(schedule) - 1)]

    def policy_step(images, labels, index):
        loss, _, stats = step(images, labels, decided_mask(k, decided_at(progress.step), images.device), index)
        return loss, {**stats, "decided": decided_at(progress.step)}

    def record(epoch, sums):
        stats = means(sums)
        stats.pop("decided", None)
        head = {"phase": "curriculum", "epoch": epoch, "decided_blocks": decided_at(progress.step - 1)}
        return {**head, **stats}

    common.run_epochs(
        policy_step,
        optimizer,
        None,
        progress,
        checkpointer,
        data,
        prep,
        recipe,
        cfg.epochs,
        generator,
        "curriculum",
        record=record,
        name="train policy",
        total_steps=total,
        min_shard=2,  # BatchNorm in the policy needs two samples (on every rank, which step together)
        postfix=lambda loss, stats: {
            "reward": f"{stats['reward']:.3f}",
            "flops": f"{stats['flops_ratio']:.2f}",
            "decided": stats["decided"],
        },
    )
    distributed.broadcast_buffers(controller)
    controller.eval()
    dyn.eval()
    return progress.history


def finetune_jointly(
    dyn: BlockSkipModel, data, prep, recipe, config, checkpointer: Checkpointer | None = None
) -> list[dict]:
    """Joint fine-tuning: the policy keeps learning by REINFORCE (every block decided) while
    the backbone modules of ``finetune_modules`` learn from cross-entropy + self-distillation
    from the original network, on the network the sampled actions execute.

    The tuned units become copies owned by ``dyn`` (saved under ``dyn.tuned``); BatchNorm
    stays in eval mode. AdamW with a cosine schedule; returns one record per epoch.
    ``checkpointer`` saves the state at every epoch end and restores it when resuming.
    """
    cfg = recipe.train
    checkpointer = checkpointer or Checkpointer.disabled()
    teacher = common.teacher_logits(dyn, data.fit, prep, recipe, checkpointer) if cfg.distill_weight > 0 else None
    indices = common.tunable_units(dyn, config.finetune_modules, "options.finetune_modules")
    common.own_tuned_units(dyn, indices)
    dyn.plan["replay"]["tuned"] = indices
    inserted, _ = common.trainable_parts(dyn, [])
    backbone = []
    for i in indices:
        for name, param in dyn.units[i].named_parameters():
            if not config.finetune_modules or any(
                name == t or name.startswith(t + ".") for t in config.finetune_modules
            ):
                param.requires_grad_(True)
                backbone.append(param)
    controller = dyn.dyn.controller
    controller.train()
    optimizer, scheduler, params = common.adamw_with_cosine(
        inserted, backbone, config.finetune_lr, cfg, config.finetune_epochs, len(data.fit), config.backbone_lr
    )
    steps = common.training_steps(config.finetune_epochs, len(data.fit), cfg.batch_size)
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    mask = decided_mask(dyn.num_blocks, dyn.num_blocks, recipe.device)
    progress = checkpointer.begin("fine-tuning", config.finetune_epochs, dyn, optimizer, scheduler, generator)

    def step(images, labels, index):
        policy_loss, out, stats = reinforce_step(dyn, images, labels, config, mask, backbone_grad=True)
        if teacher is None:
            task_loss = torch.nn.functional.cross_entropy(out, labels)
        else:
            task_loss = distillation_loss(
                out, labels, teacher[index].to(out.device), cfg.distill_temperature, cfg.distill_weight
            )
        return policy_loss + task_loss, task_loss, stats

    # a block no sample of a rank's share keeps gets no gradient there
    step = distributed.wrap_step(params, step, find_unused=True)

    def joint_step(images, labels, index):
        loss, task_loss, stats = step(images, labels, index)
        return loss, {"task_loss": task_loss.item(), **stats}

    common.run_epochs(
        joint_step,
        optimizer,
        scheduler,
        progress,
        checkpointer,
        data,
        prep,
        recipe,
        config.finetune_epochs,
        generator,
        "finetune",
        name="fine-tune jointly",
        total_steps=steps,
        min_shard=2,
        postfix=lambda loss, stats: {"reward": f"{stats['reward']:.3f}", "flops": f"{stats['flops_ratio']:.2f}"},
    )
    for param in backbone:
        param.requires_grad_(False)
    distributed.broadcast_buffers(dyn.dyn)
    controller.eval()
    dyn.eval()
    return progress.history


@torch.no_grad()
def offset_for_flops(dyn: BlockSkipModel, split, prep, recipe, flops_ratio: float) -> float:
    """The offset on every keep-logit at which the greedy policy's mean FLOPs ratio on ``split``
    is at most ``flops_ratio`` and as close to it as bisection gets."""
    (logits,) = map_batches(
        dyn.dyn.controller.start, split, prep, recipe.data.batch_size, recipe.device, "policy decisions"
    )
    static = dyn.static_flops()
    reach = float(logits.abs().max()) + 1.0  # from every block dropped to every block kept
    low, high = -reach, reach
    for _ in range(40):
        middle = (low + high) / 2
        ratio = float(dyn.sample_flops(logits + middle >= 0).mean()) / static
        low, high = (low, middle) if ratio > flops_ratio else (middle, high)
    return low


def fit_corrections(
    dyn: BlockSkipModel, data, prep, recipe, config, checkpointer: Checkpointer | None = None
) -> tuple[list[dict], float]:
    """Fit the skip corrections to the policy as it will be deployed: greedy decisions at the
    offset where they cost ``config.correction_flops_ratio``, by self-distillation from the
    original network; backbone and policy frozen.

    While the policy learns, the corrections see sampled (bounded, so noisy) decisions; the
    greedy policy drops fewer, fixed patterns of blocks, and corrections fitted to them recover
    much of what dropping costs. Returns (one record per epoch, the offset used).
    """
    cfg = recipe.train
    checkpointer = checkpointer or Checkpointer.disabled()
    teacher = common.teacher_logits(dyn, data.fit, prep, recipe, checkpointer)
    inserted, _ = common.trainable_parts(dyn, [])
    for param in dyn.dyn.controller.parameters():
        param.requires_grad_(False)
    corrections = list(dyn.dyn.corrections.parameters())
    epochs = config.correction_epochs
    optimizer, scheduler, params = common.adamw_with_cosine(
        corrections, [], config.correction_lr, cfg, epochs, len(data.fit)
    )
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    progress = checkpointer.begin("corrections", epochs, dyn, optimizer, scheduler, generator)
    if progress.epoch >= epochs and progress.history:
        # finished before a resumed run; the policy that set the offset is restored only later
        offset = progress.history[-1]["greedy_offset"]
    else:
        offset = offset_for_flops(dyn, data.fit, prep, recipe, config.correction_flops_ratio)
    static = dyn.static_flops()

    def step(images, labels, index):
        with torch.no_grad():
            keep = dyn.dyn.controller.start(images) + offset >= 0
        out = dyn.route_with(images, keep).logits
        target = teacher[index].to(out.device)
        loss = distillation_loss(out, labels, target, cfg.distill_temperature, cfg.distill_weight)
        return loss, {"flops_ratio": float(dyn.sample_flops(keep).mean()) / static}

    step = distributed.wrap_step(params, step, find_unused=True)
    record = {"greedy_offset": offset}  # in the checkpoint too, for a resumed run
    common.run_epochs(
        step, optimizer, scheduler, progress, checkpointer, data, prep, recipe, epochs, generator, "corrections", record
    )
    for param in inserted:
        param.requires_grad_(False)
    dyn.eval()
    return progress.history, offset
