"""The ImageNet-scale built-in recipe runs end to end (random weights, a handful of tiny images)."""

from __future__ import annotations

import json

import pytest
import torch

import dynconvert
from dynconvert.recipe import build_recipe, default_recipe_name


def test_resnet50_picks_its_builtin_recipe():
    assert default_recipe_name("resnet50", "early-exit") == "resnet50-early-exit"
    recipe = build_recipe(None, "resnet50", "early-exit")
    assert recipe.data.eval_split == "validation"
    assert recipe.model.pretrained is True


def test_resnet50_recipe_smoke(tiny_imagenet_style_data, tmp_path):
    out = tmp_path / "out"
    dynconvert.convert(
        "resnet50",
        strategy="early-exit",
        data=str(tiny_imagenet_style_data),
        out=out,
        model__pretrained=False,
        model__num_classes=3,
        train__epochs=1,
        data__batch_size=8,
        evaluate__latency_samples=1,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["evaluation"] == "validation"
    assert report["evaluated_samples"] == 6
    assert 0 < report["flops_ratio"] <= 1.05
    assert report["inserted_flops"] < 0.05 * report["static"]["flops"]


def test_every_builtin_recipe_builds_for_its_family():
    for name in dynconvert.builtin_recipe_names():
        family, strategy = name.split("-", 1)
        model = {"cifar_resnet": "cifar_resnet20", "efficientnet": "tf_efficientnet_lite0"}.get(family, family)
        models = [model, "cifar_resnet56"] if strategy == "cascade" else model
        assert default_recipe_name(model, strategy) == name
        assert build_recipe(None, models, strategy).strategy == strategy


def test_efficientnet_resolution_recipe_takes_its_preprocessing_from_the_model():
    import timm

    from dynconvert.toolkit.data import Preprocess

    prep = Preprocess.from_model(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert prep.mean == prep.std == (0.5, 0.5, 0.5) and prep.interpolation == "bicubic"
    assert build_recipe(None, "mobilenetv3_large_100", "resolution").options["scales"] == [0.5, 0.75, 1.0]


@pytest.mark.parametrize("strategy", ["early-exit", "skipnet", "blockdrop"])
def test_efficientnet_recipes_convert_end_to_end(tiny_imagenet_style_data, tmp_path, strategy):
    """The family's recipes as a user gets them (random weights, 64 px, a few images): the
    exits, gates or policy land on an inverted-residual network and the run reports honestly."""
    out = tmp_path / strategy
    dynconvert.convert(
        "efficientnet_lite0",
        strategy=strategy,
        data=str(tiny_imagenet_style_data),
        out=out,
        model__pretrained=False,
        model__num_classes=3,
        model__input_size=[64, 64],
        train__epochs=1,
        evaluate__latency_samples=1,
    )
    report = json.loads((out / "report.json").read_text())
    assert report["evaluated_samples"] == 6
    assert report["accuracy_drop_vs_best_point"] >= 0.0
    # the policy reads a fixed 48 px image, sized for 224 px inputs: at 64 px it weighs more
    assert report["inserted_flops"] < (0.2 if strategy == "blockdrop" else 0.05) * report["static"]["flops"]
    assert 0 < report["flops_ratio"] <= 1.2
    assert dynconvert.load(out)(torch.zeros(2, 3, 64, 64)).shape == (2, 3)
