"""Evaluation-mode BatchNorms as plain arithmetic, for export."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynconvert.runtime.folding import batchnorm_scale_shift


class FrozenBatchNorm(nn.Module):
    """An evaluation-mode BatchNorm as a per-channel scale and shift.

    torch.export's batch norm asks whether the batch is empty, which it cannot answer for
    a sub-batch of data-dependent size; this form asks nothing.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        scale, shift = batchnorm_scale_shift(bn)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every evaluation-mode BatchNorm frozen to a scale and shift."""
    module = copy.deepcopy(module).eval().requires_grad_(False)
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.track_running_stats:
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, FrozenBatchNorm(child))
    return module
