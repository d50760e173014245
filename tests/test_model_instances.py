"""The Python API on models the user built: timm instances created with their own arguments
(class count, input size) convert at the size of the data in hand, run at that size, refuse
others in one line, and save and load without the user's help; a module of the user's own
loads with ``model=`` and says so when it is missing."""

from __future__ import annotations

import pytest
import timm
import torch

import dynconvert
from dynconvert.models.cifar_resnet import CifarResNet
from dynconvert.toolkit.data import load_conversion_data, normalize

TINY = dict(
    train__epochs=1,
    train__batch_size=32,
    data__batch_size=32,
    evaluate__latency_samples=4,
    calibrate__max_accuracy_drop=None,
    calibrate__flops_ratio=0.8,
)


def cnn(seed: int, depth: int = 10):
    torch.manual_seed(seed)
    return timm.create_model(f"resnet{depth}t", num_classes=3).eval()


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3).eval()


def instances(strategy: str):
    if strategy == "cascade":
        return [cnn(1, 10), cnn(2, 14)]
    return cnn(1)


def images_of(dyn):
    data = load_conversion_data(dyn.recipe.data, dyn.preprocess)
    return normalize(data.evaluation.images[:12], dyn.preprocess)


@pytest.mark.parametrize("strategy", dynconvert.list_strategies())
def test_a_timm_instance_converts_at_the_data_size_and_loads_by_architecture(strategy, tiny_data, tmp_path):
    out = tmp_path / "out"
    dyn = dynconvert.convert(instances(strategy), strategy, data=str(tiny_data), out=out, **TINY)
    assert tuple(dyn.preprocess.input_size) == (3, 32, 32), "the data's size, not the configuration's 224"
    assert dyn.recipe.model_configs()[0].name == "resnet10t"
    x = images_of(dyn)
    loaded = dynconvert.load(out)
    with torch.no_grad():
        a, b = dyn.route(x), loaded.route(x)
        assert torch.equal(a.decisions, b.decisions)
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(dyn(x), loaded(x))
    with pytest.raises(dynconvert.DynconvertError, match="converted for 32x32 images and got 48x48"):
        loaded(torch.randn(2, 3, 48, 48))


def test_a_vision_transformer_converts_at_its_own_size(tiny_data, tmp_path):
    dyn = dynconvert.convert(vit(), "early-exit", data=str(tiny_data), out=tmp_path / "out", **TINY)
    assert tuple(dyn.preprocess.input_size) == (3, 32, 32)
    loaded = dynconvert.load(tmp_path / "out")
    x = images_of(dyn)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), loaded(x))


def test_a_timm_instance_with_arguments_that_cannot_be_read_back_asks_for_the_model(tiny_data, tmp_path):
    torch.manual_seed(0)
    shallow = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=3).eval()
    dynconvert.convert(shallow, "early-exit", data=str(tiny_data), out=tmp_path / "out", **TINY)
    with pytest.raises(dynconvert.DynconvertError, match=r"dynconvert.load\(path, model=timm.create_model"):
        dynconvert.load(tmp_path / "out")
    loaded = dynconvert.load(tmp_path / "out", model=shallow)
    assert tuple(loaded.preprocess.input_size) == (3, 32, 32)


def test_a_module_of_your_own_loads_with_model_and_says_so_without(tiny_data, tmp_path):
    torch.manual_seed(0)
    own = CifarResNet(depth=8, num_classes=3).eval()
    dynconvert.convert(own, "early-exit", data=str(tiny_data), out=tmp_path / "out", **TINY)
    with pytest.raises(dynconvert.DynconvertError, match=r"module of your own \(CifarResNet\).*model=YourModule"):
        dynconvert.load(tmp_path / "out")
    assert tuple(dynconvert.load(tmp_path / "out", model=own).preprocess.input_size) == (3, 32, 32)
