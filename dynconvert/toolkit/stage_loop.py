"""The one training-stage loop every strategy's training runs through.

A stage is some epochs of steps: the caller brings how an epoch's order is drawn, how that
order becomes batches, and a step function that returns the batch's loss and per-sample
statistics; the loop owns the progress bar, the finiteness check, the backward pass scaled for
distributed training, the optimizer and schedule steps, the running sums, checkpoints after
every step and epoch, and the per-epoch record. A resumed stage starts where ``progress``
stands (epoch, batch, step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from dynconvert.progress import progress_bar
from dynconvert.toolkit import distributed
from dynconvert.toolkit.checkpoint import Checkpointer, Progress
from dynconvert.toolkit.stage_loop_errors import check_finite

# (the step's positional arguments, samples on this rank, samples in the global batch)
Batch = tuple[tuple, int, int]


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's learning rate from its initial value down to zero over ``total_steps``
    on a half cosine (closed form, so a resumed run repeats the same rates)."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def run_stage(
    name: str,
    epochs: int,
    step: Callable[..., tuple[torch.Tensor, dict[str, float]] | None],
    optimizer: torch.optim.Optimizer,
    scheduler,
    progress: Progress,
    checkpointer: Checkpointer,
    epoch_order: Callable[[], torch.Tensor],
    epoch_batches: Callable[[torch.Tensor, int], Iterable[Batch]],
    epoch_record: Callable[[int, dict[str, float]], Any],
    total_steps: int,
    postfix: Callable[[torch.Tensor, dict[str, float]], dict] | None = None,
) -> list:
    """Run the stage's remaining epochs; return its per-epoch records (``progress.history``).

    Args:
        name: shown on the progress bar and in a non-finite-loss error.
        step: ``step(*args) -> (loss, statistics)`` for one batch (statistics are per-sample
            means), or None to skip a batch that cannot be used (it still counts as a step).
        scheduler: stepped after every optimizer step, or None for a constant rate.
        epoch_order: draws one epoch's sample order (called only for an epoch not yet begun).
        epoch_batches: ``(order, first_batch) -> batches`` of that order from ``first_batch`` on.
        epoch_record: ``(epoch, sums) -> record``; ``sums`` holds, over all ranks, the loss and
            each statistic summed over samples, and the sample count under ``"n"``.
        total_steps: the stage's steps, for the progress bar.
        postfix: what the progress bar shows after a step.
    """
    with progress_bar(total=total_steps, initial=progress.step, desc=name, unit="step") as bar:
        for epoch in range(progress.epoch, epochs):
            order = progress.epoch_order(epoch_order)
            for args, n, n_global in epoch_batches(order, progress.batch):
                result = step(*args)
                if result is not None:
                    loss, stats = result
                    check_finite(loss, f"{name}, epoch {epoch + 1}")
                    optimizer.zero_grad(set_to_none=True)
                    distributed.scale_loss(loss, n, n_global).backward()
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    progress.add({"loss": loss.item() * n, **{k: v * n for k, v in stats.items()}, "n": n})
                    if postfix is not None:
                        bar.set_postfix(postfix(loss, stats))
                progress.batch += 1
                progress.step += 1
                bar.update(1)
                checkpointer.after_step(progress)
            progress.end_epoch(epoch_record(epoch, distributed.sum_over_ranks(progress.totals)))
            checkpointer.end_epoch(progress)
    return progress.history


def means(sums: dict[str, float]) -> dict[str, float]:
    """Per-sample means from the sums :func:`run_stage` keeps (``"n"`` the count)."""
    n = max(1, sums.get("n", 0))
    return {k: v / n for k, v in sums.items() if k != "n"}
