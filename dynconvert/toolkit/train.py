"""Training loops for inserted modules: batched passes over decoded data, with progress bars."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.progress import progress_bar
from dynconvert.toolkit import distributed
from dynconvert.toolkit.checkpoint import Checkpointer
from dynconvert.toolkit.data import ImageSplit, Preprocess, normalize
from dynconvert.toolkit.stage_loop_errors import NonFiniteLoss, check_finite  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def batches(split: ImageSplit, prep: Preprocess, batch_size: int, device: str, order=None) -> Iterator:
    """Yield ``(normalised images, labels, index)`` batches of ``split`` in ``order``."""
    order = torch.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        images = normalize(split.images[index].to(device, non_blocking=True), prep)
        yield images, split.labels[index].to(device), index


def train_batches(
    split: ImageSplit, prep: Preprocess, batch_size: int, device: str, order: torch.Tensor, skip: int = 0
) -> Iterator:
    """Yield ``(images, labels, index, global batch size)``: this rank's share of each global
    batch of ``split`` in ``order`` (all of it in a single process), from batch ``skip`` on."""
    for start in range(skip * batch_size, len(order), batch_size):
        index = distributed.shard(order[start : start + batch_size])
        images = normalize(split.images[index].to(device, non_blocking=True), prep)
        yield images, split.labels[index].to(device), index, len(order[start : start + batch_size])


@torch.no_grad()
def map_batches(
    fn: Callable, split: ImageSplit, prep: Preprocess, batch_size: int, device: str, desc: str, shard: bool = False
) -> list[torch.Tensor]:
    """Apply ``fn`` to all of ``split``; concatenate each output on the CPU.

    ``fn(images)`` returns a tensor, or a sequence whose items are tensors or sequences of
    tensors (``(final, [exit_0, ...])``); the result lists every tensor in that order.
    ``shard``: under torchrun each rank computes its part and every rank gets the whole.
    """
    rows = distributed.my_rows(len(split)) if shard else torch.arange(len(split))
    outputs: list[list[torch.Tensor]] = []
    with progress_bar(total=len(rows), desc=desc, unit="img", mininterval=1.0) as bar:
        for images, _, _ in batches(split, prep, batch_size, device, rows):
            outputs.append([o.float().cpu() for o in _flat(fn(images))])
            bar.update(len(images))
    parts = [torch.cat(parts) for parts in zip(*outputs)]
    return distributed.gather_rows(parts, len(split)) if shard else parts


def _flat(out) -> list[torch.Tensor]:
    if not isinstance(out, (list, tuple)):
        return [out]
    return [t for item in out for t in (item if isinstance(item, (list, tuple)) else [item])]


def distillation_loss(
    logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, temperature: float, weight: float
) -> torch.Tensor:
    """``(1 - weight) * CE(labels) + weight * T^2 * KL(teacher_T || student_T)``."""
    hard = F.cross_entropy(logits, labels)
    if weight == 0.0:
        return hard
    soft = F.kl_div(
        F.log_softmax(logits / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * hard + weight * temperature**2 * soft


def fit_on_cached_features(
    classifiers: list[Callable[[torch.Tensor], torch.Tensor]],
    parameters: list[nn.Parameter],
    features: list[torch.Tensor],
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    config,
    seed: int,
    desc: str = "train exits",
    module: nn.Module | None = None,
    checkpointer: Checkpointer | None = None,
) -> list[float]:
    """Train several classifiers on cached features at once, with self-distillation.

    ``classifiers[k]`` maps ``features[k]`` to logits. AdamW with a cosine schedule; returns
    the mean loss of each epoch. ``module`` holds the classifiers (its state is what
    ``checkpointer`` saves at every epoch end and restores when resuming).
    """
    from dynconvert.toolkit.stage_loop import cosine_schedule, run_stage

    checkpointer = checkpointer or Checkpointer.disabled()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * config.epochs)
    module = module if module is not None else nn.ParameterList(parameters)
    progress = checkpointer.begin("exit heads", config.epochs, module, optimizer, scheduler, generator)

    def step(index):
        target, teacher = labels[index], teacher_logits[index]
        return sum(
            distillation_loss(clf(f[index]), target, teacher, config.distill_temperature, config.distill_weight)
            for clf, f in zip(classifiers, features)
        )

    step = distributed.wrap_step(parameters, step)

    def epoch_batches(order, first_batch):
        for start in range(first_batch * config.batch_size, len(order), config.batch_size):
            index = distributed.shard(order[start : start + config.batch_size])
            yield (index,), len(index), len(order[start : start + config.batch_size])

    return run_stage(
        desc,
        config.epochs,
        lambda index: (step(index), {}),
        optimizer,
        scheduler,
        progress,
        checkpointer,
        lambda: torch.randperm(len(labels), generator=generator),
        epoch_batches,
        lambda epoch, sums: sums.get("loss", 0.0) / len(labels) / max(1, len(classifiers)),
        steps_per_epoch * config.epochs,
    )


def freeze(module: nn.Module, trainable: list[str] = ()) -> list[nn.Parameter]:
    """Freeze ``module`` except the submodules named in ``trainable``; return those parameters.

    Frozen parts are put in eval mode too, so BatchNorm statistics stay as they were.
    """
    module.eval()
    params = []
    for name, param in module.named_parameters():
        keep = any(name == t or name.startswith(t + ".") for t in trainable)
        param.requires_grad_(keep)
        if keep:
            params.append(param)
    return params
