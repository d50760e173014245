"""The model cascade end to end on tiny data: the command line with two models and two weights
files, calibration to the budget, real deferral, save/load by weights hash, ONNX export, and
the errors a user meets (one model, weights that do not match the models, the wrong order)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import dynconvert
from dynconvert.cli import main
from dynconvert.runtime.confidence import confidence
from dynconvert.strategies.cascade.model import CascadeModel
from dynconvert.toolkit.costs import count_flops

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def two_weights(tmp_path_factory):
    """Seeded random cifar_resnet20 and cifar_resnet32 (3 classes) as state dicts, cheapest first."""
    folder = tmp_path_factory.mktemp("cascade-weights")
    paths = []
    for seed, name in ((1, "cifar_resnet20"), (2, "cifar_resnet32")):
        torch.manual_seed(seed)
        path = folder / f"{name}.pt"
        torch.save(timm.create_model(name, num_classes=3).state_dict(), path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cascade_out(tiny_data, two_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade") / "out"
    code = main(
        [
            "cifar_resnet20",
            "cifar_resnet32",
            "--strategy",
            "cascade",
            "--weights",
            *map(str, two_weights),
            "--data",
            str(tiny_data),
            "--out",
            str(out),
            "--set",
            "calibrate.max_accuracy_drop=0.2",
            "--set",
            "model.num_classes=3",
            "--set",
            "evaluate.latency_samples=4",
            "-q",
        ]
    )
    assert code == 0
    return out


def test_report_measures_against_the_last_model_and_marks_each_alone(cascade_out):
    report = json.loads((cascade_out / "report.json").read_text())
    assert report["model"] == "cifar_resnet20+cifar_resnet32"
    assert report["strategy"] == "cascade"
    costs = report["plan"]["stage_flops"]
    assert costs[0] < costs[1] and report["static"]["flops"] == pytest.approx(costs[1])
    assert sum(report["dynamic"]["stage_histogram"]) == report["evaluated_samples"]
    labels = [p["label"] for p in report["sweep_on_evaluation"] if "label" in p]
    assert labels == ["cifar_resnet20 alone", "cifar_resnet32 alone"]
    assert set(report["accuracy_drop_vs_labelled"]) == set(labels)
    assert "accuracy_drop_vs_best_point" in report
    assert report["calibration"]["combine"] in (True, False)
    assert (cascade_out / "report.png").stat().st_size > 0


def test_every_base_model_is_recorded_with_its_weights_hash(cascade_out, two_weights):
    meta = json.loads((cascade_out / "model" / "meta.json").read_text())
    bases = meta["base"]["models"]
    assert [b["model"] for b in bases] == ["cifar_resnet20", "cifar_resnet32"]
    assert all(len(b["weights_sha256"]) == 64 for b in bases)
    assert bases[1]["weights"] == str(two_weights[1].resolve())


def test_load_gives_the_same_decisions_and_logits(cascade_out):
    dyn = dynconvert.load(cascade_out)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    again = dynconvert.load(cascade_out)
    with torch.no_grad():
        a, b = dyn.route(x), again.route(x)
    assert torch.equal(a.decisions, b.decisions)
    torch.testing.assert_close(a.logits, b.logits)


def test_only_the_samples_handed_on_run_the_next_model(cascade_out):
    dyn = dynconvert.load(cascade_out)
    dyn.dyn.thresholds.fill_(0.0)  # every sample kept by the first model
    x = torch.randn(1, 3, 32, 32)
    assert count_flops(dyn.route, x) == pytest.approx(dyn.stage_flops[0], rel=0.01)
    dyn.dyn.thresholds.fill_(2.0)  # no sample kept: the first model is not run at all
    dyn.dyn.combine.fill_(0.0)
    assert count_flops(dyn.route, x) == pytest.approx(dyn.stage_flops[1], rel=0.01)
    batch = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    dyn.dyn.thresholds.fill_(_median_confidence(dyn, batch))
    with torch.no_grad():
        routed = dyn.route(batch)
    handed_on = int((routed.decisions == 1).sum())
    assert 0 < handed_on < len(batch), "the test needs both stages to keep some samples"
    per_sample = dyn.stage_flops[0] + handed_on / len(batch) * dyn.stage_flops[1]  # count_flops is per sample
    assert count_flops(dyn.route, batch) == pytest.approx(per_sample, rel=0.01)


def _median_confidence(dyn, x: torch.Tensor) -> float:
    """A threshold at which the first model keeps about half of ``x``."""
    with torch.no_grad():
        answer, judged, _ = dyn.answer(0, dyn.stages[0](x), None, 1)
    return float(confidence(judged, dyn.criterion).median())


@pytest.mark.parametrize("combine", [0.0, 1.0])
def test_onnx_export_keeps_the_deferral(cascade_out, tmp_path, combine):
    dyn = dynconvert.load(cascade_out)
    dyn.dyn.combine.fill_(combine)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    dyn.dyn.thresholds.fill_(_median_confidence(dyn, x))
    with torch.no_grad():
        decisions = dyn.route(x).decisions
    assert 0 < int(decisions.sum()) < len(x), "the test needs both stages to keep some samples"
    report = dynconvert.export_onnx(dyn, tmp_path / "cascade.onnx", images=x, random_inputs=8)
    assert report["passed"] and report["decisions_identical"]
    assert report["outputs"] == ["logits", "stages"]


def test_one_model_is_refused_with_the_count(tiny_data):
    with pytest.raises(dynconvert.DynconvertError, match="converts 2 to 8 model"):
        dynconvert.build_recipe(None, "cifar_resnet20", "cascade")


def test_weights_must_match_the_models_one_to_one(two_weights):
    with pytest.raises(dynconvert.DynconvertError, match="one per model"):
        dynconvert.build_recipe(None, ["cifar_resnet20", "cifar_resnet32"], "cascade", weights=[str(two_weights[0])])


def test_a_later_model_cheaper_than_an_earlier_one_is_warned_about(tiny_data, two_weights, caplog):
    with caplog.at_level("WARNING"):
        dynconvert.convert(
            ["cifar_resnet32", "cifar_resnet20"],
            strategy="cascade",
            data=str(tiny_data),
            weights=[two_weights[1], two_weights[0]],
            model__num_classes=3,
            evaluate={"latency_samples": 0},
        )
    assert "is cheaper than cifar_resnet32 before it" in caplog.text


def test_agreement_rule_hands_on_what_disagrees_with_the_stage_before():
    torch.manual_seed(0)
    stages = [torch.nn.Linear(6, 4) for _ in range(3)]
    dyn = CascadeModel(stages, [1.0, 2.0, 4.0]).eval()
    dyn.dyn.agreement.fill_(1.0)
    dyn.dyn.thresholds.copy_(torch.tensor([2.0, 0.01]))  # the first keeps nothing, the second all it agrees on
    x = torch.randn(64, 6)
    with torch.no_grad():
        routed = dyn.route(x)
        agree = stages[1](x).argmax(1) == stages[0](x).argmax(1)
        one_by_one = torch.cat([dyn.route(row[None]).decisions for row in x])
    assert 0 < int(agree.sum()) < len(x)
    assert torch.equal(routed.decisions, torch.where(agree, 1, 2))
    assert torch.equal(one_by_one, routed.decisions)
    assert dyn.live_stages() == [0, 1, 2], "the stage before must run for the rule to judge"
