"""Models torch.fx cannot trace: a clear error naming the module, and leaf modules as the way out."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from dynconvert.errors import DynconvertError
from dynconvert.runtime.early_exit import EarlyExitModel
from dynconvert.toolkit.trace import trace


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class SignFlip(nn.Module):
    """Python control flow on a value of the data: torch.fx cannot trace through it."""

    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x


class Branching(nn.Module):
    """A small residual network with one data-dependent module in the middle and no feature_info."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        # no bias: the stem's output of -x is minus that of x, so x and -x take both branches
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.body = nn.Sequential(SignFlip(), Residual(8), Residual(8), Residual(8), Residual(8))
        self.fc = nn.Linear(8, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


def test_untraceable_module_is_named_with_the_way_out():
    with pytest.raises(DynconvertError) as err:
        trace(Branching().eval())
    message = str(err.value)
    assert "torch.fx could not trace Branching" in message
    assert "(inside SignFlip)" in message
    assert "--set model.leaf_modules=[NAME]" in message


def test_a_leaf_module_makes_it_traceable():
    model = Branching().eval()
    gm = trace(model, leaf_modules=["body.0"], example=torch.randn(2, 3, 16, 16))
    assert any(node.op == "call_module" and node.target == "body.0" for node in gm.graph.nodes)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert float(model.stem(x).mean()) * float(model.stem(-x).mean()) < 0  # both branches below
        for batch in (x, -x):
            assert_close(gm(batch), model(batch))


def test_early_exit_on_an_untraceable_model_needs_the_leaf(prepare_early_exit):
    """Without feature_info there is no stage fallback: the error reaches the user; with the leaf
    declared the conversion inserts exits and, none taken, equals the original network."""
    torch.manual_seed(0)
    model = Branching()
    with pytest.raises(DynconvertError, match="model.leaf_modules"):
        prepare_early_exit(model)
    dyn = prepare_early_exit(model, overrides={"model.leaf_modules": ["body.0"], "options.fractions": [0.3, 0.7]})
    assert isinstance(dyn, EarlyExitModel) and dyn.num_exits == 2
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        for batch in (x, -x):  # both ways through the data-dependent module
            assert_close(dyn.route(batch).logits, model(batch), rtol=1e-5, atol=1e-6)
