"""Block skipping refuses, in one line, networks where it cannot save: a residual added to part
of the channels (the shortcut path needs the whole branch), and a controller dearer than every
block it could skip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.recipe import build_recipe
from dynconvert.strategies import get_strategy


class PartialResidual(nn.Module):
    """Adds its input to the first channels of its output only (as ReXNet's blocks do)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.channels = channels

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, : self.channels] + x, y[:, self.channels :]], 1)


class Net(nn.Module):
    def __init__(self, block: nn.Module, width: int = 8, out: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.block = block
        self.head = nn.Linear(out, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv(x)


def prepare(name: str, model: nn.Module, side: int = 16):
    recipe = build_recipe(None, "cifar_resnet20", name, ["model.pretrained=false"])
    strategy = get_strategy(name).from_options(recipe.options)
    return strategy.prepare([model.eval()], recipe, torch.randn(2, 3, side, side), 3)


@pytest.mark.parametrize("name", ["skipnet", "blockdrop"])
def test_a_residual_on_part_of_the_channels_is_not_offered_for_skipping(name):
    with pytest.raises(DynconvertError, match="no residual block whose skipping saves computation"):
        prepare(name, Net(PartialResidual(8)))


def test_a_controller_dearer_than_every_block_is_refused():
    # one 1x1 convolution of 2 channels is all there is to skip; BlockDrop's policy costs far more
    with pytest.raises(DynconvertError, match="the controller costs .* more than skipping every block would save"):
        prepare("blockdrop", Net(Residual(2), width=2, out=2), side=32)
