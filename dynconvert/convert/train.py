"""Training loops for inserted modules: batched passes over decoded data, with progress bars."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dynconvert.convert.data import ImageSplit, Preprocess, normalize
from dynconvert.errors import DynconvertError

log = logging.getLogger(__name__)


def batches(split: ImageSplit, prep: Preprocess, batch_size: int, device: str, order=None) -> Iterator:
    """Yield ``(normalised images, labels, index)`` batches of ``split`` in ``order``."""
    order = torch.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        images = normalize(split.images[index].to(device, non_blocking=True), prep)
        yield images, split.labels[index].to(device), index


@torch.no_grad()
def map_batches(
    fn: Callable, split: ImageSplit, prep: Preprocess, batch_size: int, device: str, desc: str
) -> list[torch.Tensor]:
    """Apply ``fn`` to all of ``split``; concatenate each output on the CPU.

    ``fn(images)`` returns a tensor, or a sequence whose items are tensors or sequences of
    tensors (``(final, [exit_0, ...])``); the result lists every tensor in that order.
    """
    outputs: list[list[torch.Tensor]] = []
    with tqdm(total=len(split), desc=desc, unit="img", mininterval=1.0) as bar:
        for images, _, _ in batches(split, prep, batch_size, device):
            outputs.append([o.float().cpu() for o in _flat(fn(images))])
            bar.update(len(images))
    return [torch.cat(parts) for parts in zip(*outputs)]


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
) -> list[float]:
    """Train several classifiers on cached features at once, with self-distillation.

    ``classifiers[k]`` maps ``features[k]`` to logits. Adam with a cosine schedule; returns
    the mean loss of each epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    total = max(1, steps_per_epoch * config.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history = []
    for epoch in tqdm(range(config.epochs), desc=desc, unit="epoch"):
        order = torch.randperm(len(labels), generator=generator)
        running = 0.0
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            target, teacher = labels[index], teacher_logits[index]
            loss = sum(
                distillation_loss(clf(f[index]), target, teacher, config.distill_temperature, config.distill_weight)
                for clf, f in zip(classifiers, features)
            )
            check_finite(loss, f"exit heads, epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(index)
        history.append(running / len(labels) / max(1, len(classifiers)))
    return history


def check_finite(loss: torch.Tensor, where: str) -> None:
    """Stop with a clear error when the loss is NaN or infinite (nothing is written then)."""
    if not torch.isfinite(loss):
        raise DynconvertError(
            f"the training loss became {loss.item()} ({where}); lower train.lr or check the data, nothing was written"
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
