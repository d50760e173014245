"""Threshold calibration: the sweep pays for the heads it runs, and can be costed in measured time."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_RUN

import dynconvert
from dynconvert.runtime.cost_table import exit_cost_table
from dynconvert.toolkit.calibrate import OFF, bound_drops_from_best, drop_upper_bound, threshold_sweep
from dynconvert.toolkit.choose import choose_point


def test_cost_table_counts_only_enabled_heads():
    segments = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    heads = torch.tensor([1.0, 2.0], dtype=torch.float64)
    both = exit_cost_table(segments, heads, torch.tensor([True, True]))
    assert both.tolist() == [11.0, 33.0, 63.0]
    second_only = exit_cost_table(segments, heads, torch.tensor([False, True]))
    assert second_only.tolist() == [10.0, 32.0, 62.0]


def _two_exit_problem(first_head_cost: float):
    """The first exit is never right, the second always is: the first is only worth its head's cost."""
    torch.manual_seed(0)
    n = 400
    conf = torch.stack([torch.rand(n) * 0.5, 0.5 + torch.rand(n) * 0.5])
    exit_correct = torch.stack([torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    final_correct = torch.ones(n, dtype=torch.bool)
    segments = torch.tensor([1.0, 1.0, 8.0], dtype=torch.float64)
    heads = torch.tensor([first_head_cost, 0.01], dtype=torch.float64)
    return threshold_sweep(conf, exit_correct, final_correct, segments, heads, float(segments.sum()))


def test_sweep_turns_off_an_exit_that_does_not_pay_for_its_head():
    chosen, met = choose_point(_two_exit_problem(first_head_cost=0.5), max_accuracy_drop=0.01)
    assert met
    assert chosen.thresholds[0] == OFF, "a head that never helps must not run"
    assert chosen.thresholds[1] <= 1.0
    assert chosen.flops_ratio == pytest.approx((1 + 1 + 0.01) / 10)


def test_operating_point_respects_the_accuracy_budget():
    path = _two_exit_problem(first_head_cost=0.0)
    chosen, met = choose_point(path, max_accuracy_drop=0.01)
    assert met
    assert chosen.accuracy_drop_bound <= 0.01
    assert chosen.flops_ratio == min(p.flops_ratio for p in path if p.accuracy_drop_bound <= 0.01)


def test_a_budget_out_of_reach_keeps_the_most_accurate_point_and_says_so(caplog):
    path = _two_exit_problem(first_head_cost=0.0)
    with caplog.at_level("WARNING"):
        chosen, met = choose_point(path, flops_ratio=0.01)
    assert not met and "no operating point" in caplog.text
    best = min(p.accuracy_drop_bound for p in path)
    assert chosen.accuracy_drop_bound == best
    dicts = [
        {"flops_ratio": p.flops_ratio, "accuracy_drop": p.accuracy_drop, "accuracy_drop_bound": p.accuracy_drop_bound}
        for p in path
    ]
    assert choose_point(dicts, max_accuracy_drop=-1.0)[0]["accuracy_drop_bound"] == best


@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_latency_costed_calibration_reports_time_and_flops(tiny_data, tiny_weights, runtime):
    dyn = dynconvert.convert(
        "cifar_resnet20",
        strategy="early-exit",
        data=str(tiny_data),
        model__weights=str(tiny_weights),
        options__cost="latency",
        options__latency_runtime=runtime,
        options__latency_threads=1,
        options__fractions=[0.3, 0.6],
        **TINY_RUN,
    )
    calibration = dyn.report["calibration"]
    assert calibration["cost"] == "latency"
    table = calibration["latency_table"]
    assert table["runtime"] == runtime and table["threads"] == 1
    assert len(table["segment_ms"]) == dyn.num_exits + 1 and len(table["head_ms"]) == dyn.num_exits
    assert all(t > 0 for t in table["segment_ms"] + table["head_ms"])
    chosen = calibration["chosen"]
    assert chosen["time_ratio"] is not None and 0 < chosen["flops_ratio"] <= 1.0 + 1e-6
    assert all(p["time_ratio"] is not None for p in calibration["sweep"])


def test_head_overhead_prices_heads_in_the_sweep_but_not_in_the_report(tiny_data, tiny_weights):
    def convert(overhead):
        return dynconvert.convert(
            "cifar_resnet20",
            strategy="early-exit",
            data=str(tiny_data),
            model__weights=str(tiny_weights),
            options__head_overhead_mflops=overhead,
            options__fractions=[0.3, 0.6],
            **TINY_RUN,
        )

    plain = convert(0.0).report["calibration"]
    assert all(p["priced_ratio"] is None for p in plain["sweep"])
    # a head run priced above the whole network: no exit can pay for its head, so none runs
    priced = convert(1e4)
    chosen = priced.report["calibration"]["chosen"]
    assert chosen["thresholds"] == [OFF] * priced.num_exits
    assert chosen["flops_ratio"] == pytest.approx(1.0) and chosen["priced_ratio"] == pytest.approx(1.0)
    assert priced.report["flops_ratio"] == pytest.approx(1.0)
    for point in priced.report["calibration"]["sweep"]:
        heads_on = sum(t <= 1.0 for t in point["thresholds"])
        assert point["priced_ratio"] >= point["flops_ratio"] - 1e-9
        assert (point["priced_ratio"] > point["flops_ratio"]) == (heads_on > 0)


def test_a_part_that_does_not_export_says_how_to_calibrate_instead(tiny_data, tiny_weights, monkeypatch):
    import dynconvert.export.onnx_export as onnx_export

    def refuse(graph, *args, **kwargs):
        raise dynconvert.DynconvertError(f"torch.onnx.export failed for {type(graph).__name__}: unsupported")

    monkeypatch.setattr(onnx_export, "export_module", refuse)
    with pytest.raises(dynconvert.DynconvertError, match="options.latency_runtime=pytorch"):
        dynconvert.convert(
            "cifar_resnet20",
            strategy="early-exit",
            data=str(tiny_data),
            model__weights=str(tiny_weights),
            options__cost="latency",
            options__latency_runtime="onnxruntime",
            options__fractions=[0.3, 0.6],
            **TINY_RUN,
        )


def test_budget_from_the_best_point_when_it_beats_the_static_model():
    points = [
        {"accuracy_drop": 0.0, "accuracy_drop_bound": 0.0, "flops_ratio": 1.0},  # the static model
        {"accuracy_drop": -0.05, "accuracy_drop_bound": -0.04, "flops_ratio": 0.95},  # fitted parts beat it
        {"accuracy_drop": -0.045, "accuracy_drop_bound": -0.043, "flops_ratio": 0.85},  # half a point below best
        {"accuracy_drop": 0.0, "accuracy_drop_bound": 0.005, "flops_ratio": 0.6},  # five points below best
    ]
    assert choose_point(points, max_accuracy_drop=0.01)[0]["flops_ratio"] == 0.6
    assert choose_point(points, max_accuracy_drop=0.01, drop_from="best")[0]["flops_ratio"] == 0.85
    # never looser than the static model: when no point beats it, the two agree
    worse = [
        {**p, "accuracy_drop": abs(p["accuracy_drop"]), "accuracy_drop_bound": abs(p["accuracy_drop_bound"])}
        for p in points
    ]
    assert choose_point(worse, 0.01, drop_from="best")[0] == choose_point(worse, 0.01)[0]


def test_drops_from_the_best_point_are_bounded_on_their_own_differences():
    n = 4000
    generator = torch.Generator().manual_seed(0)
    static = torch.rand(n, generator=generator) < 0.52
    best = torch.rand(n, generator=generator) < 0.62  # fitted heads, right on other samples
    cheaper = best.clone()
    cheaper[best.nonzero()[:20, 0]] = False  # half a point below the best, the same answers otherwise
    points = [
        {"accuracy_drop": float(static.float().mean() - h.float().mean()), "flops_ratio": r}
        for h, r in ((static, 1.0), (best, 0.95), (cheaper, 0.85))
    ]
    for p, h in zip(points, (static, best, cheaper)):
        p["accuracy_drop_bound"] = drop_upper_bound(static.float() - h.float())[1]
    bound_drops_from_best(points, [static, best, cheaper])
    assert points[1]["accuracy_drop_from_best"] == 0.0
    assert abs(points[2]["accuracy_drop_from_best"] - 20 / n) < 1e-6
    # the shifted bound carries the spread of every changed answer and refuses the cheaper point;
    # the bound on the two points' own differences accepts it
    shifted = points[2]["accuracy_drop_bound"] - points[1]["accuracy_drop"]
    assert shifted > 0.01 >= points[2]["accuracy_drop_from_best_bound"]
    assert choose_point(points, 0.01, drop_from="best")[0]["flops_ratio"] == 0.85
