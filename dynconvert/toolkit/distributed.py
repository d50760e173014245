"""Training in several processes under torchrun: the process group from torchrun's environment,
each rank's share of every global batch, gradients averaged by DistributedDataParallel, and
metrics summed over ranks.

In a single process (no torchrun, or ``WORLD_SIZE=1``) every helper here returns its input
unchanged, so a plain run computes exactly what it computed before.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs and checkpoints (rank 0)."""
    return rank() == 0


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes, when it describes more than one process.

    NCCL for a CUDA device (each process on the GPU of its ``LOCAL_RANK``), gloo otherwise.
    Returns True when this call created the group (the caller then destroys it).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        # "cuda" without an index then means this process's own GPU everywhere it is used
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def shutdown(created: bool) -> None:
    """Leave the process group if :func:`init_from_env` created it."""
    if created and dist.is_initialized():
        dist.destroy_process_group()


def shard(index: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch's sample indices (every ``world``-th, from ``rank``)."""
    world = world_size()
    return index if world == 1 else index[rank() :: world]


def smallest_shard(n: int) -> int:
    """Size of the smallest share when a global batch of ``n`` samples is split over the ranks."""
    return n // world_size()


def scale_loss(loss: torch.Tensor, n_local: int, n_global: int) -> torch.Tensor:
    """Weigh a rank's mean loss so that DDP's average of gradients over ranks equals the
    gradient of the mean over the whole global batch, also when the shares differ in size."""
    world = world_size()
    return loss if world == 1 else loss * (n_local * world / n_global)


class _Step(nn.Module):
    """Holds the trainable parameters, so DDP sees them, and runs a training step's ``fn``."""

    def __init__(self, parameters: list[nn.Parameter], fn: Callable):
        super().__init__()
        self.params = nn.ParameterList(parameters)
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def wrap_step(parameters: list[nn.Parameter], fn: Callable, find_unused: bool = False) -> Callable:
    """``fn`` (a step computing a loss from a batch) whose backward averages the gradients of
    ``parameters`` over ranks, by DistributedDataParallel; ``fn`` itself in a single process.

    ``find_unused``: some parameters may get no gradient in a step (a block no sample ran).
    """
    if world_size() == 1:
        return fn
    device = parameters[0].device
    return nn.parallel.DistributedDataParallel(
        _Step(parameters, fn),
        device_ids=[device] if device.type == "cuda" else None,
        find_unused_parameters=find_unused,
    )


def _device() -> torch.device:
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """``values`` summed key by key over the ranks (the same dict in a single process)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank, so that every rank takes the same branch."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics of a trained controller) on every rank."""
    if world_size() == 1:
        return
    for buffer in module.buffers():
        moved = buffer.to(_device())
        dist.broadcast(moved, 0)
        buffer.copy_(moved)


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if world_size() > 1:
        dist.barrier()


def local_rank() -> int:
    """This process's rank among those on its machine (torchrun's ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", rank())) if world_size() > 1 else 0


def local_world_size() -> int:
    """How many processes of the run share this machine (torchrun's ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) if world_size() > 1 else 1


def one_machine() -> bool:
    """Whether every rank runs on this machine (and so sees the same local files)."""
    return local_world_size() == world_size()


def my_local_rows(n: int) -> torch.Tensor:
    """This rank's contiguous share of ``0..n-1`` among the ranks on its machine: what it
    writes into a file every rank of the machine shares."""
    return torch.tensor_split(torch.arange(n), local_world_size())[local_rank()]


def my_rows(n: int) -> torch.Tensor:
    """This rank's contiguous share of the row indices ``0..n-1``."""
    return torch.tensor_split(torch.arange(n), world_size())[rank()]


def gather_rows(parts: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """Put together tensors whose rows each rank computed for its :func:`my_rows` of ``n``."""
    if world_size() == 1:
        return parts
    sizes = [len(s) for s in torch.tensor_split(torch.arange(n), world_size())]
    longest = max(sizes)
    out = []
    for part in parts:
        padded = part.new_zeros((longest, *part.shape[1:]))
        padded[: len(part)] = part
        pieces = [torch.empty_like(padded, device=_device()) for _ in sizes]
        dist.all_gather(pieces, padded.to(_device()))
        out.append(torch.cat([p[:s].cpu() for p, s in zip(pieces, sizes)]))
    return out
