"""Skip corrections: a cheap learned stand-in for the residual branch of a skipped block.

A frozen backbone was trained with every block in place; the layers after a skipped block
expect its contribution. The correction adds a per-position linear map of the shortcut
(a 1x1 convolution on (C, H, W) maps, a linear layer on the last dimension of tokens and
(H, W, C) maps) where the residual branch was: ``shortcut + map(shortcut)``. The map starts
at zero, so an untrained correction is the plain shortcut, and it costs at most a twelfth of the
branch it stands in for (full rank on a BasicBlock; factored through fewer channels on the wide
shortcuts of bottleneck blocks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.folding import FoldsForInference


class SkipCorrection(FoldsForInference):
    """``shortcut + map(shortcut)``: what a skipped block's addition yields; ``map`` is zero at
    initialisation. In eval mode under inference mode a full-rank map and the skip are one
    product, ``(map + identity)(shortcut)``: at batch 1, one operation instead of two.

    Args:
        feature_shape: shape of one sample's shortcut, ``(C, H, W)``, ``(H, W, C)``, ``(T, D)`` or ``(D,)``.
        channels_last: a 3-dimensional feature is laid out ``(H, W, C)``.
        rank: None for a full ``C x C`` map; else the map factors through ``rank`` channels
            (``C -> rank -> C``), for wide features where a full map would cost too much.
    """

    def __init__(self, feature_shape: tuple[int, ...], channels_last: bool = False, rank: int | None = None):
        super().__init__()
        self.conv = len(feature_shape) == 3 and not channels_last
        channels = feature_shape[0] if self.conv else feature_shape[-1]
        layer = nn.Conv2d if self.conv else nn.Linear

        def linear(n_in: int, n_out: int, bias: bool = True) -> nn.Module:
            return layer(n_in, n_out, 1, bias=bias) if self.conv else layer(n_in, n_out, bias=bias)

        if rank is None or rank >= channels:
            self.map = linear(channels, channels)
            last = self.map
        else:
            self.map = nn.Sequential(linear(channels, rank, bias=False), linear(rank, channels))
            last = self.map[1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, shortcut: torch.Tensor) -> torch.Tensor:
        folded = None if self.training else self.cached_folding()
        if folded is None:
            return shortcut + self.map(shortcut)
        weight, bias = folded
        return pointwise_conv(shortcut, weight, bias) if self.conv else F.linear(shortcut, weight, bias)

    def _fold_sources(self) -> list[torch.Tensor]:
        return list(self.map.parameters())

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not isinstance(self.map, (nn.Conv2d, nn.Linear)):
            return None  # a factored map: the product through fewer channels is already cheap
        weight = self.map.weight
        identity = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return weight + identity.view(weight.shape), self.map.bias


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 convolution ``weight`` of shape ``(out, in, 1, 1)``;
    a batch laid out plainly (NCHW) goes through one matrix product over the pixels instead.

    On CPU, PyTorch's 1x1 convolution of a few channels on a plain batch is slow: with 16
    channels at 32x32 and batch 64 it takes two to ten times as long as the product, from run to
    run (bench/kernels.py). At batch 1 and in channels-last it is as fast as the product or
    faster, and stays.
    """
    if x.shape[0] > 1 and x.is_contiguous():
        return pixel_product(x, weight, bias)
    return F.conv2d(x, weight, bias)


def pixel_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution ``F.conv2d(x, weight, bias)`` of a plainly laid out (NCHW) ``x`` as
    one matrix product over its pixels."""
    matrix = weight.view(weight.shape[0], weight.shape[1])
    out = torch.matmul(matrix, x.flatten(2)).add_(bias.view(-1, 1))
    return out.view(x.shape[0], -1, *x.shape[2:])


def correction_rank(feature_shape: tuple[int, ...], channels_last: bool, branch_flops: float) -> int | None:
    """The rank that keeps a correction within a twelfth of the FLOPs of the branch it stands in
    for: None (full rank) when a full map fits, else the largest rank that does (at least 1)."""
    conv = len(feature_shape) == 3 and not channels_last
    channels = feature_shape[0] if conv else feature_shape[-1]
    positions = math.prod(feature_shape) // channels
    budget = branch_flops / 12
    if 2 * channels * channels * positions <= budget:
        return None
    return max(1, int(budget // (4 * channels * positions)))
