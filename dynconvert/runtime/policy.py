"""BlockDrop's policy network: one look at a downsampled image decides every block at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.folding import FoldsForInference, batchnorm_scale_shift

STEM_STRIDES = (1, 2, 4)


class PolicyBlock(nn.Module):
    """A ResNet BasicBlock: two 3x3 convolutions with BatchNorm, and a projection shortcut
    where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _stem(in_channels: int, width: int, stride: int) -> nn.Sequential:
    if stride == 4:  # the ImageNet ResNet stem: 7x7 stride 2, then 3x3 max pooling stride 2
        conv = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    conv = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU())


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free convolution followed by BatchNorm in eval mode, as one convolution."""
    scale, shift = batchnorm_scale_shift(bn)
    return conv.weight * scale.view(-1, 1, 1, 1), shift


class PolicyNetwork(FoldsForInference):
    """A small ResNet on the downsampled input with one keep-logit per droppable block.

    ``start(x)`` resizes ``x`` to ``input_size`` px, runs a stem and one :class:`PolicyBlock`
    per entry of ``widths`` (stride 2 from the second on), global average pooling and a
    Linear layer; the ``(batch, blocks)`` logits are the state, and ``decide(index, h, state)``
    reads column ``index``. The Linear layer starts at zero weight and bias ``init_logit > 0``,
    so an untrained policy keeps every block (the original network).

    Args:
        num_blocks: droppable blocks to decide.
        in_channels: channels of the network's input.
        input_size: side, in pixels, the input is resized to (bilinear; 2x downsampling
            averages 2x2 pixels).
        widths: channels of the stages (CIFAR: 16, 32, 64; ResNet-10 on ImageNet: 64 ... 512).
        stem_stride: 1 or 2 (a 3x3 convolution), 4 (7x7 stride 2 + max pooling, ImageNet-style).
        init_logit: the initial keep-logit of every block.

    Example::

        policy = PolicyNetwork(27, input_size=16)
        logits = policy.start(torch.randn(8, 3, 32, 32))  # (8, 27), all 1.0 at first
    """

    kind = "policy"

    def __init__(
        self,
        num_blocks: int,
        in_channels: int = 3,
        input_size: int = 16,
        widths: tuple[int, ...] | list[int] = (16, 32, 64),
        stem_stride: int = 1,
        init_logit: float = 1.0,
    ):
        super().__init__()
        if stem_stride not in STEM_STRIDES:
            raise ValueError(f"stem_stride must be one of {STEM_STRIDES}, got {stem_stride}")
        self.input_size = int(input_size)
        widths = list(widths)
        self.stem = _stem(in_channels, widths[0], stem_stride)
        self.stages = nn.Sequential(
            *(PolicyBlock(widths[max(i - 1, 0)], w, 1 if i == 0 else 2) for i, w in enumerate(widths))
        )
        self.head = nn.Linear(widths[-1], num_blocks)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, init_logit)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Keep-logits ``(batch, blocks)`` for the images ``x``.

        In eval mode every BatchNorm is folded into the convolution before it: half the
        operations, which is what the policy's time at batch 1 is made of.
        """
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.training or not isinstance(self.stem[1], nn.BatchNorm2d):  # (export swaps its own norm in)
            h = self.stages(self.stem(x))
        else:
            h = self._folded_features(x)
        return self.head(h.mean((2, 3)))

    def _folded_features(self, x: torch.Tensor) -> torch.Tensor:
        stem, blocks = self.folded()
        h = F.conv2d(x, *stem).relu_()
        if len(self.stem) > 3:
            h = self.stem[3](h)  # the ImageNet stem's max pooling
        # channels-last from here on: on these small maps PyTorch's convolutions mostly take less
        # time in it than in the plain layout, at batch 1 and 64 (bench/kernels.py)
        h = h.contiguous(memory_format=torch.channels_last)
        for conv1, conv2, shortcut in blocks:
            out = F.conv2d(F.conv2d(h, *conv1).relu_(), *conv2)
            out += h if shortcut is None else F.conv2d(h, *shortcut)
            h = out.relu_()
        return h

    def _conv_bn_pairs(self) -> tuple[tuple, list[tuple]]:
        """The stem's (convolution, BatchNorm) pair and, per block, those of its two convolutions
        and of its shortcut (None for a plain one): what the eval forward folds."""
        blocks = []
        for block in self.stages:
            shortcut = None if isinstance(block.shortcut, nn.Identity) else (block.shortcut[0], block.shortcut[1])
            blocks.append(((block.conv1, block.bn1), (block.conv2, block.bn2), shortcut))
        return (self.stem[0], self.stem[1]), blocks

    def _fold_sources(self) -> list[torch.Tensor]:
        stem, blocks = self._conv_bn_pairs()
        pairs = [stem] + [pair for block in blocks for pair in block if pair is not None]
        return [t for conv, bn in pairs for t in (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)]

    def _fold(self) -> tuple[tuple, list[tuple]]:
        """What :meth:`_folded_features` runs: :meth:`_conv_bn_pairs` with each pair as
        ``F.conv2d`` arguments ``(weight, bias, stride, padding)``, its BatchNorm folded in; the
        blocks' weights are laid out channels-last, as their inputs are."""

        def conv_args(pair, layout: torch.memory_format = torch.channels_last) -> tuple | None:
            if pair is None:
                return None
            conv, bn = pair
            weight, bias = _fold_batchnorm(conv, bn)
            return weight.contiguous(memory_format=layout), bias, conv.stride, conv.padding

        stem, blocks = self._conv_bn_pairs()
        return conv_args(stem, torch.contiguous_format), [tuple(map(conv_args, block)) for block in blocks]

    independent_decisions = True  # every keep-logit comes from the image, at the start
    decides_at_start = True  # ``start`` returns every keep-logit; ``decide`` reads no feature

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """Decide every block at once; the logits are the state."""
        return self.logits(x)

    def decide(self, index: int, h: torch.Tensor, state: torch.Tensor):
        """Keep-logit of block ``index`` (computed in :meth:`start`); ``h`` is not looked at."""
        return state[:, index], state
