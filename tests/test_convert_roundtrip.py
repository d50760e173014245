"""A whole (tiny) conversion through the public API, then save and load."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import yaml
from torch.testing import assert_close

import dynconvert
from dynconvert.recipe import Recipe, build_recipe, from_dict
from dynconvert.toolkit.data import Preprocess, load_conversion_data, normalize

TINY_CONVERSION = dict(
    model__pretrained=False,
    model__num_classes=3,
    train__epochs=1,
    train__batch_size=32,
    data__batch_size=32,
    evaluate__latency_samples=4,
    options__fractions=[0.3, 0.6],
    # a FLOPs budget forces exits to be taken, so the loaded model has real decisions to repeat
    calibrate__max_accuracy_drop=None,
    calibrate__flops_ratio=0.7,
)


@pytest.fixture(scope="module")
def converted(tiny_data, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "out"
    dyn = dynconvert.convert(
        "cifar_resnet20", data=str(tiny_data), out=out, model__weights=str(tiny_weights), **TINY_CONVERSION
    )
    return dyn, out


@pytest.fixture(scope="module")
def eval_batch(converted):
    dyn, _ = converted
    data = load_conversion_data(dyn.recipe.data, dyn.preprocess)
    return normalize(data.evaluation.images[:24], dyn.preprocess)


def test_output_folder_contents(converted):
    _, out = converted
    for name in ("recipe.yaml", "report.json", "report.png", "model/meta.json", "model/dynamic.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob("*") if "partial" in p.name or ".tmp" in p.name]


def test_report_json(converted):
    dyn, out = converted
    report = json.loads((out / "report.json").read_text())
    for key in ("flops_ratio", "evaluated_samples", "splits", "flops_definition"):
        assert key in report, key
    for key in ("accuracy", "flops"):
        assert key in report["static"] and key in report["dynamic"], key
    assert 0.0 <= report["static"]["accuracy"] <= 1.0 and 0.0 <= report["dynamic"]["accuracy"] <= 1.0
    assert report["evaluated_samples"] == 48
    histogram = report["dynamic"]["exit_histogram"]
    assert len(histogram) == dyn.num_exits + 1 == 3
    assert sum(histogram) == 48
    assert sum(histogram[:-1]) > 0, "the FLOPs budget should make some samples exit early"
    assert report["flops_ratio"] == pytest.approx(report["dynamic"]["flops"] / report["static"]["flops"])
    assert report["flops_ratio"] <= 0.7 + 0.2  # budget met on calibration data; evaluation is close
    assert report["static"]["flops"] == pytest.approx(dyn.static_flops())
    assert report["splits"]["evaluation"] == "test"
    assert report["splits"]["fit_samples"] + report["splits"]["calibration_samples"] == 96
    assert "FLOPs" in report["flops_definition"]
    assert report == json.loads(json.dumps(dyn.report))  # what was written is what was returned


def test_recipe_yaml_reproduces_the_recipe(converted):
    dyn, out = converted
    data = yaml.safe_load((out / "recipe.yaml").read_text())
    assert from_dict(Recipe, data) == dyn.recipe
    rebuilt = build_recipe(str(out / "recipe.yaml"), model="cifar_resnet20")
    assert rebuilt == dyn.recipe
    assert rebuilt.train.epochs == 1 and rebuilt.calibrate.flops_ratio == 0.7


def test_load_gives_identical_logits_and_exits(converted, eval_batch):
    dyn, out = converted
    loaded = dynconvert.load(out)
    assert isinstance(loaded, type(dyn))
    assert loaded.plan["replay"] == dyn.plan["replay"]
    assert_close(loaded.dyn.thresholds, dyn.dyn.thresholds, rtol=0, atol=0)
    assert_close(loaded.dyn.temperatures, dyn.dyn.temperatures, rtol=0, atol=0)
    with torch.no_grad():
        expected, got = dyn.route(eval_batch), loaded.route(eval_batch)
    assert got.decisions.tolist() == expected.decisions.tolist()
    assert len(set(expected.decisions.tolist())) > 1, "the batch should mix exits"
    assert_close(got.logits, expected.logits, rtol=1e-6, atol=1e-6)
    for i in (0, 5):  # batch-1 path too
        with torch.no_grad():
            single = loaded.route(eval_batch[i : i + 1])
        assert int(single.decisions) == int(expected.decisions[i])
        assert_close(single.logits[0], expected.logits[i], rtol=1e-4, atol=1e-5)


def test_load_also_accepts_the_model_subfolder(converted):
    dyn, out = converted
    loaded = dynconvert.load(out / "model")
    assert loaded.recipe == dyn.recipe
    assert loaded.base_info == dyn.base_info


def test_load_refuses_changed_base_weights(converted, tmp_path):
    _, out = converted
    meta = json.loads((out / "model" / "meta.json").read_text())
    weights = tmp_path / "other.pt"
    torch.save(timm.create_model("cifar_resnet20", num_classes=3).state_dict(), weights)
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("recipe.yaml", "dynamic.safetensors"):
        (folder / name).write_bytes((out / "model" / name).read_bytes())
    meta["base"]["weights"] = str(weights)  # same path recorded, different bytes than hashed
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(dynconvert.DynconvertError, match="changed since the model was saved"):
        dynconvert.load(folder)


def test_load_of_a_folder_without_a_model(tmp_path):
    with pytest.raises(dynconvert.DynconvertError, match="no saved dynamic model"):
        dynconvert.load(tmp_path)


def test_load_of_a_random_init_base_rebuilds_the_same_backbone(tmp_path, prepare_early_exit):
    from dynconvert.convert.build import build_model
    from dynconvert.convert.pipeline import seed_everything
    from dynconvert.convert.save import save_dynamic

    recipe = build_recipe(
        model="cifar_resnet20",
        overrides={"model.pretrained": False, "model.num_classes": 3, "options.fractions": [0.3, 0.6]},
    )
    seed_everything(recipe.seed)  # as convert_recipe does
    model = build_model(recipe.model)
    dyn = prepare_early_exit(model, overrides={"model.num_classes": 3, "options.fractions": [0.3, 0.6]})
    dyn.recipe, dyn.preprocess = recipe, Preprocess.from_model(model)
    dyn.base_info = {"model": "cifar_resnet20", "weights": None, "weights_sha256": None, "num_classes": 3}
    save_dynamic(dyn, tmp_path / "model")
    torch.manual_seed(99)  # whatever the caller's random state
    loaded = dynconvert.load(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(loaded.forward_all(x)[0], dyn.forward_all(x)[0])


def test_model_with_fewer_classes_than_the_data_is_refused(tiny_data, tmp_path):
    overrides = {**TINY_CONVERSION, "model__num_classes": 2}
    with pytest.raises(dynconvert.DynconvertError, match="3 classes but the model predicts 2"):
        dynconvert.convert("cifar_resnet20", data=str(tiny_data), **overrides)


def test_a_nan_loss_stops_training_with_a_clear_error(tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    overrides = {**TINY_CONVERSION, "train__lr": float("inf")}
    with pytest.raises(dynconvert.DynconvertError, match="training loss became"):
        dynconvert.convert(
            "cifar_resnet20", data=str(tiny_data), out=out, model__weights=str(tiny_weights), **overrides
        )
    assert not out.exists()


def test_same_recipe_seed_and_data_give_the_same_report(tiny_data, tiny_weights):
    reports = []
    for _ in range(2):
        dyn = dynconvert.convert(
            "cifar_resnet20", data=str(tiny_data), model__weights=str(tiny_weights), **TINY_CONVERSION
        )
        report = {k: v for k, v in dyn.report.items() if k not in ("seconds", "latency")}
        reports.append(json.dumps(report, sort_keys=True, default=str))
    assert reports[0] == reports[1]
