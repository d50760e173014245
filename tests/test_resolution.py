"""The resolution cascade's BatchNorm statistics per input size: estimated exactly, owned by
each smaller size alone (the weights stay shared), and kept by a saved conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynconvert
from dynconvert.cli import main
from dynconvert.strategies.resolution import batchnorm_layers, reestimate_batchnorm
from dynconvert.toolkit.data import ImageSplit, Preprocess, normalize


@pytest.fixture(scope="module")
def converted_with_batchnorm(tiny_data, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("resolution") / "out"
    args = ["cifar_resnet20", "--strategy", "resolution", "--weights", str(tiny_weights), "--data", str(tiny_data)]
    sets = ["model.num_classes=3", "options.scales=[0.5,1.0]", "options.batchnorm_images=40"]
    sets += ["evaluate.latency_samples=4"]
    assert main([*args, "--out", str(out), "-q", *[a for s in sets for a in ("--set", s)]]) == 0
    return out


def test_statistics_are_the_average_of_the_batches_statistics():
    prep = Preprocess((3, 8, 8), 1.0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    split = ImageSplit(torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8), torch.zeros(10, dtype=torch.long), "t")
    layer = nn.BatchNorm2d(3)
    stage = nn.Sequential(layer, nn.Dropout(0.5))
    reestimate_batchnorm(stage, split, prep, batch_size=5, device="cpu", desc="bn")
    halves = normalize(split.images, prep).split(5)
    torch.testing.assert_close(layer.running_mean, torch.stack([h.mean((0, 2, 3)) for h in halves]).mean(0))
    torch.testing.assert_close(layer.running_var, torch.stack([h.var((0, 2, 3)) for h in halves]).mean(0))
    assert layer.momentum == 0.1 and not stage.training


def test_each_smaller_size_owns_its_statistics_and_shares_the_weights(converted_with_batchnorm):
    dyn = dynconvert.load(converted_with_batchnorm)
    assert dyn.own_batchnorm == [0]
    small, native = dyn.stages[0][1], dyn.stages[1]
    assert all(a is b for a, b in zip(small.parameters(), native.parameters()))
    (_, small_bn), (_, native_bn) = batchnorm_layers(small)[0], batchnorm_layers(native)[0]
    assert small_bn.weight is native_bn.weight
    assert not torch.allclose(small_bn.running_mean, native_bn.running_mean)
    assert len([k for k in dyn.inserted_state() if k.startswith("dyn.batchnorm.")]) == 2 * len(batchnorm_layers(small))


def test_a_loaded_conversion_answers_with_the_statistics_it_was_fitted_with(converted_with_batchnorm):
    first, second = dynconvert.load(converted_with_batchnorm), dynconvert.load(converted_with_batchnorm)
    for dyn in (first, second):
        dyn.dyn.thresholds.fill_(0.0)  # every sample answered at the smaller size
        dyn.dyn.combine.fill_(0.0)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(first(x), second(x))
        stored = {k: v.clone() for k, v in first.inserted_state().items()}
        for _, layer in batchnorm_layers(first.stages[0]):
            layer.reset_running_stats()  # what a model rebuilt without them would answer with
        assert not torch.allclose(first(x), second(x))
        first.load_inserted_state(stored)
        torch.testing.assert_close(first(x), second(x))


def test_onnx_export_keeps_the_agreement_rule_across_three_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    from dynconvert.models.cifar_resnet import CifarResNet
    from dynconvert.recipe import build_recipe
    from dynconvert.strategies import get_strategy

    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=3).eval()
    recipe = build_recipe(None, "cifar_resnet20", "resolution", ["model.pretrained=false"])
    strategy = get_strategy("resolution").from_options(recipe.options)
    dyn = strategy.prepare([model], recipe, torch.randn(2, 3, 32, 32), 3).eval()
    dyn.recipe, dyn.preprocess = recipe, Preprocess((3, 32, 32), 1.0, (0.5,) * 3, (0.25,) * 3)
    dyn.base_info = {"num_classes": 3, "model": "cifar_resnet20", "weights": None, "weights_sha256": None}
    dyn.dyn.agreement.fill_(1.0)
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stage_logits = [stage(x) for stage in dyn.stages]
        conf = torch.softmax(stage_logits[1], 1).amax(1)
        dyn.dyn.thresholds.copy_(torch.tensor([2.0, float(conf.median())]))  # only the middle size keeps some
        decisions = dyn.route(x).decisions
        agree = stage_logits[1].argmax(1) == stage_logits[0].argmax(1)
    assert not (decisions == 1)[~agree].any(), "a disagreeing sample is never kept"
    assert 0 < int((decisions == 1).sum()) < len(x)
    report = dynconvert.export_onnx(dyn, tmp_path / "resolution.onnx", images=x, random_inputs=8)
    assert report["passed"] and report["decisions_identical"]


def test_a_model_built_for_one_input_size_is_refused_in_one_line():
    import timm

    from dynconvert.recipe import build_recipe
    from dynconvert.strategies import get_strategy

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3).eval()
    recipe = build_recipe(None, "vit_tiny_patch16_224", "resolution", ["model.pretrained=false"])
    strategy = get_strategy("resolution").from_options(recipe.options)
    with pytest.raises(dynconvert.DynconvertError, match="takes one input size only: it does not run at 16x16"):
        strategy.prepare([vit], recipe, torch.randn(2, 3, 32, 32), 3)
