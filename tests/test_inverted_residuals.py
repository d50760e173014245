"""Block skipping on MobileNet/EfficientNet-style networks: the inverted residual blocks with an
identity shortcut are found, and a skipped one computes nothing of its residual branch."""

from __future__ import annotations

import pytest
import timm
import torch

from dynconvert.recipe import build_recipe
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.costs import count_flops


@pytest.mark.parametrize("name", ["skipnet", "blockdrop"])
def test_efficientnet_lite_blocks_with_identity_shortcuts_are_skipped_for_real(name):
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    recipe = build_recipe(None, "tf_efficientnet_lite0", name, ["model.pretrained=false"])
    strategy = get_strategy(name).from_options(recipe.options)
    dyn = strategy.prepare([model], recipe, torch.randn(2, 3, 64, 64), 5).eval()
    # Lite0's stages repeat 1, 2, 2, 3, 3, 4, 1 blocks: every block after a stage's first keeps
    # its input's shape and adds it back
    assert sum(dyn.droppable) == 9
    x = torch.randn(1, 3, 64, 64)
    strategy.open_all_(dyn)
    everything = count_flops(dyn.route, x)
    strategy.take_all_(dyn)
    skipping = count_flops(dyn.route, x)
    branches = sum(f - s for f, s, d in zip(dyn.full_flops, dyn.skipped_flops, dyn.droppable) if d)
    assert everything - skipping == pytest.approx(branches, rel=0.02)
    assert branches > 0.2 * count_flops(model, x), "the skippable blocks are a real share of the network"
