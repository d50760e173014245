"""Evaluation-mode BatchNorms and skip corrections in their fixed inference form, for export."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynconvert.runtime.corrections import SkipCorrection
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


class FoldedCorrection(nn.Module):
    """A full-rank skip correction as the one product it is in inference, ``(map + identity)``,
    with no addition after it: a 1x1 convolution followed by a per-channel scale (of one) and
    shift (the bias).

    That is the form of the backbone's convolutions with their frozen BatchNorms, and for the
    same reason: onnxruntime folds the scale and shift into the convolution, which gives it
    weights of its own inside an ``If`` branch, and only such weights does it reorder for its
    blocked layout there (it leaves weights shared with the outer graph in plain layout).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
        self.conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("scale", torch.ones(weight.shape[0], dtype=weight.dtype))
        self.register_buffer("shift", torch.zeros_like(self.scale) if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


def folded_correction(correction: SkipCorrection) -> nn.Module | None:
    """A full-rank skip correction as one product (:class:`FoldedCorrection` on maps, a linear
    layer on tokens); None for a factored map, whose product through fewer channels stays."""
    folded = correction._fold()
    if folded is None:
        return None
    weight, bias = folded
    if correction.conv:
        return FoldedCorrection(weight, bias)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every evaluation-mode BatchNorm frozen to a scale and shift,
    and every full-rank skip correction folded into one product."""
    module = copy.deepcopy(module).eval().requires_grad_(False)
    for name, child in list(module.named_modules()):
        frozen = None
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and child.track_running_stats:
            frozen = FrozenBatchNorm(child)
        elif isinstance(child, SkipCorrection):
            frozen = folded_correction(child)
        if frozen is not None:
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name), attr, frozen)
    return module
