"""Training loops for inserted modules: batched passes over decoded data, with progress bars."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.progress import progress_bar
from dynconvert.toolkit import distributed
from dynconvert.toolkit.checkpoint import Checkpointer
from dynconvert.toolkit.data import ImageSplit, Preprocess, normalize, read_batches
from dynconvert.toolkit.rowfile import RowFile
from dynconvert.toolkit.stage_loop_errors import NonFiniteLoss, check_finite  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def batches(split: ImageSplit, prep: Preprocess, batch_size: int, device: str, order=None) -> Iterator:
    """Yield ``(normalised images, labels, index)`` batches of ``split`` in ``order``."""
    order = torch.arange(len(split)) if order is None else order
    for index, images in read_batches(split, list(order.split(batch_size))):
        yield model_input(images, prep, device), split.labels[index].to(device), index


def train_batches(
    split: ImageSplit, prep: Preprocess, batch_size: int, device: str, order: torch.Tensor, skip: int = 0
) -> Iterator:
    """Yield ``(images, labels, index, global batch size)``: this rank's share of each global
    batch of ``split`` in ``order`` (all of it in a single process), from batch ``skip`` on."""
    global_batches = order[skip * batch_size :].split(batch_size)
    # this rank's rows of every global batch, read (and decoded in workers) as batches of their own
    mine = [distributed.shard(rows) for rows in global_batches]
    for (index, images), rows in zip(read_batches(split, mine), global_batches):
        yield model_input(images, prep, device), split.labels[index].to(device), index, len(rows)


def model_input(images: torch.Tensor, prep: Preprocess, device: str) -> torch.Tensor:
    """A batch of uint8 images as the model's normalised input on ``device``.

    On the CPU an image batch is laid out channels-last: oneDNN's convolutions run markedly
    faster that way, and every layer after the first keeps the layout it is handed.
    """
    x = normalize(images.to(device, non_blocking=True), prep)
    if x.dim() == 4 and x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def map_batches(
    fn: Callable,
    split: ImageSplit,
    prep: Preprocess,
    batch_size: int,
    device: str,
    desc: str,
    shard: bool = False,
    to_disk: Path | None = None,
) -> list:
    """Apply ``fn`` to all of ``split``; concatenate each output on the CPU.

    ``fn(images)`` returns a tensor, or a sequence whose items are tensors or sequences of
    tensors (``(final, [exit_0, ...])``); the result lists every tensor in that order.
    ``shard``: under torchrun each rank computes its part and every rank gets the whole.
    ``to_disk``: a folder to write each output into as a float32 ``RowFile`` (``0.rows``,
    ``1.rows``, ...), returned instead of tensors, so memory stays bounded however many rows.
    """
    rows = distributed.my_rows(len(split)) if shard else torch.arange(len(split))
    outputs: list[list[torch.Tensor]] = []
    files: list[RowFile] = []
    with progress_bar(total=len(rows), desc=desc, unit="img", mininterval=1.0) as bar:
        for images, _, index in batches(split, prep, batch_size, device, rows):
            out = [o.float().cpu() for o in _flat(fn(images))]
            if to_disk is None:
                outputs.append(out)
            else:
                files = files or _row_files(to_disk, out, len(split))
                for rows_file, o in zip(files, out):
                    rows_file.write(int(index[0]), o)  # a rank's rows are contiguous, so each batch is too
            bar.update(len(images))
    if to_disk is not None:
        distributed.barrier()  # every rank's rows are in place before anyone reads them
        return files
    parts = [torch.cat(parts) for parts in zip(*outputs)]
    return distributed.gather_rows(parts, len(split)) if shard else parts


def _row_files(folder: Path, first: list[torch.Tensor], count: int) -> list[RowFile]:
    """One float32 ``RowFile`` per output, shaped as the first batch's rows (rank 0 creates them)."""
    shapes = [tuple(o.shape[1:]) for o in first]
    if distributed.is_main():
        for k, shape in enumerate(shapes):
            RowFile.create(folder / f"{k}.rows", shape, "float32", count)
    distributed.barrier()
    return [RowFile(folder / f"{k}.rows", shape, "float32", count) for k, shape in enumerate(shapes)]


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
    features: list,
    labels: torch.Tensor,
    teacher_logits,
    config,
    seed: int,
    desc: str = "train exits",
    module: nn.Module | None = None,
    checkpointer: Checkpointer | None = None,
) -> list[float]:
    """Train several classifiers on cached features at once, with self-distillation.

    ``classifiers[k]`` maps ``features[k]`` to logits; features and teacher logits are tensors
    or ``RowFile``s on disk (each batch's rows read when needed). AdamW with a cosine schedule; returns
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

    def rows(values, index: torch.Tensor) -> torch.Tensor:
        """Rows of a tensor, or of a ``RowFile`` (read from disk), on the labels' device."""
        if isinstance(values, torch.Tensor):
            return values[index.to(values.device)]
        return values[index.cpu()].to(labels.device, non_blocking=True)

    def step(index):
        target, teacher = labels[index], rows(teacher_logits, index)
        return sum(
            distillation_loss(clf(rows(f, index)), target, teacher, config.distill_temperature, config.distill_weight)
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
