"""Every registered strategy against the contract (dynconvert/strategies/base.py), on tiny
untrained CIFAR ResNets: a new strategy is tested here by registering it.

- invariance: in its "everything on" form the converted model computes the original's logits;
- save/load: in a mixed state, saved and loaded, it decides and computes the same;
- decisions really skip work: with every saving decision taken, the FLOPs counted while it runs
  are fewer than the original's, and match what ``flops_of`` charges for the decisions taken;
- batches route as their samples do alone.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import dynconvert
from dynconvert.models.cifar_resnet import CifarResNet
from dynconvert.recipe import build_recipe
from dynconvert.strategies import get_strategy, list_strategies
from dynconvert.toolkit.costs import count_flops
from dynconvert.toolkit.data import Preprocess

SIDE = 16
CLASSES = 3


def converted(name: str):
    """(strategy, untrained converted model, its base models) for a strategy, on tiny ResNets."""
    cls = get_strategy(name)
    torch.manual_seed(0)
    models = [CifarResNet(depth=8 + 6 * i, num_classes=CLASSES).eval() for i in range(cls.min_models)]
    names = ["cifar_resnet20"] * len(models)
    recipe = build_recipe(None, names if len(names) > 1 else names[0], name, ["model.pretrained=false"])
    strategy = cls.from_options(recipe.options)
    dyn = strategy.prepare(models, recipe, torch.randn(2, 3, SIDE, SIDE), CLASSES).eval()
    dyn.recipe = recipe  # what the pipeline records on a converted model
    dyn.preprocess = Preprocess.from_model(models[-1])
    dyn.preprocess.input_size = (3, SIDE, SIDE)
    dyn.base_info = {"num_classes": CLASSES, "model": "cifar_resnet20", "weights": None, "weights_sha256": None}
    return strategy, dyn, models


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list_strategies())
def test_everything_on_equals_the_original(name):
    strategy, dyn, models = converted(name)
    strategy.open_all_(dyn)
    x = images()
    with torch.no_grad():
        assert_close(dyn(x), models[-1](x), rtol=1e-4, atol=1e-5)
        assert_close(dyn(x[:1]), models[-1](x[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list_strategies())
def test_saved_and_loaded_model_decides_and_computes_the_same(name, tmp_path):
    strategy, dyn, models = converted(name)
    strategy.mixed_(dyn)
    dynconvert.save(dyn, tmp_path / "saved")
    loaded = dynconvert.load(tmp_path / "saved", model=models if len(models) > 1 else models[0])
    x = images()
    with torch.no_grad():
        a, b = dyn.route(x), loaded.route(x)
    assert torch.equal(a.decisions, b.decisions)
    assert_close(a.logits, b.logits)


@pytest.mark.parametrize("name", list_strategies())
def test_decisions_really_skip_work_and_are_charged_what_ran(name):
    strategy, dyn, models = converted(name)
    x = images(1)
    static = count_flops(models[-1], x)
    assert dyn.static_flops() == pytest.approx(static, rel=1e-6)
    for state in (strategy.take_all_, strategy.mixed_):
        state(dyn)
        with torch.no_grad():
            routed = dyn.route(x)
        ran = count_flops(dyn.route, x)
        charged = float(dyn.flops_of(routed.decisions)[0])
        assert ran == pytest.approx(charged, rel=0.02), f"{state.__name__}: counted {ran}, charged {charged}"
    strategy.take_all_(dyn)
    assert count_flops(dyn.route, x) < static


@pytest.mark.parametrize("name", list_strategies())
def test_a_batch_routes_as_its_samples_do_alone(name):
    strategy, dyn, _ = converted(name)
    strategy.mixed_(dyn)
    x = images()
    with torch.no_grad():
        batched = dyn.route(x)
        alone = [dyn.route(x[i : i + 1]) for i in range(len(x))]
    assert torch.equal(batched.decisions, torch.cat([a.decisions for a in alone]))
    assert_close(batched.logits, torch.cat([a.logits for a in alone]), rtol=1e-4, atol=1e-5)
