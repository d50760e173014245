"""SkipNet: residual-unit analysis, invariance, real skipping, sub-batches, save/load."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import convert_tiny
from torch.testing import assert_close

import dynconvert
from dynconvert.passes.residual import find_units, full_form, skipped_form
from dynconvert.recipe import build_recipe, strategy_config
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.costs import node_flops
from dynconvert.toolkit.trace import trace


def prepared(name="cifar_resnet20", gate="feedforward", **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = model.pretrained_cfg["input_size"][1] if name.startswith("cifar") else 64
    recipe = build_recipe(None, name, "skipnet", ["model.pretrained=false", f"options.gate={gate}"])
    strategy = get_strategy("skipnet")
    dyn = strategy(strategy_config(recipe)).prepare([model], recipe, torch.randn(2, 3, size, size), 10)
    return model, dyn, size


@pytest.mark.parametrize(
    "name,size,blocks", [("cifar_resnet20", 32, 9), ("test_resnet", 64, None), ("resnet18", 64, 8)]
)
def test_units_cover_the_network_and_find_the_residual_blocks(name, size, blocks):
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, size, size)
    gm = trace(model, example=x)
    units = find_units(gm, node_flops(gm, x))
    droppable = [u for u in units if u.droppable]
    assert droppable
    if blocks is not None:
        assert len(droppable) == blocks
    h = x
    for unit in units:
        h = full_form(gm, unit)(h)
    assert_close(h, model(x))


def test_skipped_form_keeps_the_shortcut_only():
    model = timm.create_model("cifar_resnet20", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = trace(model, example=x)
    units = find_units(gm, node_flops(gm, x))
    stem, block = units[0], units[1]
    h = full_form(gm, stem)(x)
    assert_close(skipped_form(gm, block)(h), torch.relu(h))  # identity shortcut, then the block's ReLU
    downsample = next(u for u in units if u.name == "layer2.0")
    h2 = torch.rand(2, 16, 32, 32)
    expected = torch.nn.functional.pad(h2[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert_close(skipped_form(gm, downsample)(h2), expected)


@pytest.mark.parametrize("gate", ["feedforward", "recurrent"])
@pytest.mark.parametrize("batch", [1, 6])
def test_all_gates_open_equals_the_original(gate, batch):
    model, dyn, size = prepared(gate=gate)
    dyn.dyn.bias.fill_(1e4)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        assert_close(dyn(x), model(x))
    assert dyn.last_decisions.all()


def test_skipped_blocks_really_do_not_run():
    _, dyn, size = prepared()
    calls = {i: 0 for i in range(len(dyn.units))}
    for i, unit in enumerate(dyn.units):
        unit.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    dyn.dyn.bias.fill_(-1e4)
    with torch.no_grad():
        dyn(torch.randn(4, 3, size, size))
        dyn(torch.randn(1, 3, size, size))
    for i, droppable in enumerate(dyn.droppable):
        assert calls[i] == (0 if droppable else 2)
    assert not dyn.last_decisions.any()
    assert float(dyn.sample_flops(dyn.last_decisions)[0]) < 0.2 * dyn.static_flops()


def test_skipped_blocks_do_not_run_in_the_flat_runners_either():
    """Without hooks on the units, route runs their flat runners: the layers inside a skipped
    block are not called (hooks on the layers themselves see every call)."""
    _, dyn, size = prepared()
    units, _ = dyn.runners()
    assert all(r is not u and "getattr(" not in r.code for r, u in zip(units, dyn.units))
    calls = []
    for i, unit in enumerate(dyn.units):
        first_conv = next(m for m in unit.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda *_, i=i: calls.append(i))
    dyn.dyn.bias.fill_(-1e4)
    with torch.no_grad():
        dyn(torch.randn(4, 3, size, size))
        dyn(torch.randn(1, 3, size, size))
    assert calls and not any(dyn.droppable[i] for i in calls)


@pytest.mark.parametrize("settled", [False, True], ids=["decided", "settled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("gate", ["feedforward", "recurrent"])
def test_sub_batches_equal_running_each_sample_alone(gate, channels_last, settled):
    _, dyn, size = prepared(gate=gate)
    if settled:  # the first block never runs, the last always: a recurrent gate still steps through them
        dyn.settled[0], dyn.settled[-1] = -1, 1
    torch.manual_seed(3)
    for p in dyn.dyn.controller.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(12, 3, size, size)
    if channels_last:  # the gathered sub-batches keep the layout
        dyn = dyn.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for offset in torch.linspace(-3, 3, 25):  # find a bias that gives mixed decisions
            dyn.dyn.bias.fill_(float(offset))
            batched = dyn.route(x)
            if 0.2 < batched.decisions.float().mean() < 0.8:
                break
        assert 0 < batched.decisions.float().mean() < 1, "the test needs mixed decisions"
        for i in range(len(x)):
            alone = dyn.route(x[i : i + 1])
            assert torch.equal(alone.decisions[0], batched.decisions[i])
            assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=1e-5)


def test_relaxed_pass_gives_gradients_to_every_gate():
    _, dyn, size = prepared(gate="feedforward")
    logits, probs = dyn.forward_relaxed(torch.randn(4, 3, size, size))
    (logits.sum() + probs.sum()).backward()
    for gate in dyn.dyn.controller.gates:
        assert gate[0].weight.grad is not None and gate[0].weight.grad.abs().sum() > 0


def tiny_skipnet(tiny_data, tiny_weights, out, **kwargs):
    """One epoch of SkipNet on the tiny data, calibrated over three offsets."""
    offsets = [-2.0, 0.0, 2.0]
    return convert_tiny(
        "skipnet", tiny_data, tiny_weights, out, train__epochs=1, options__calibration_offsets=offsets, **kwargs
    )


@pytest.mark.parametrize("gate,rl_epochs", [("feedforward", 0), ("recurrent", 0), ("feedforward", 1)])
def test_tiny_conversion_round_trip(gate, rl_epochs, tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    dyn = tiny_skipnet(tiny_data, tiny_weights, out, options__gate=gate, options__rl_epochs=rl_epochs)
    report = json.loads((out / "report.json").read_text())
    for key in ("blocks_used_mean", "block_execution_rate", "distinct_policies", "blocks_used_histogram"):
        assert key in report["dynamic"]
    assert 0 < report["flops_ratio"] < 1.01
    history = report["calibration"]["train"]  # the relaxed stage's epoch, then the hybrid RL stage's
    assert [h.get("phase") for h in history] == [None] + ["hybrid RL"] * rl_epochs
    settled = report["calibration"]["settled"]
    assert sum(len(v) for v in settled.values()) == dyn.num_blocks
    assert 0 < history[-1]["flops_ratio"] <= 1.01
    assert_same_routes(dyn, dynconvert.load(out))


def assert_same_routes(dyn, loaded):
    assert loaded.settled == dyn.settled
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        a, b = dyn.route(x), loaded.route(x)
    assert torch.equal(a.decisions, b.decisions)
    assert_close(a.logits, b.logits)


def test_skipped_form_leaves_its_input_alone_before_an_in_place_activation():
    model = timm.create_model("resnet18", pretrained=False).eval()  # ReLU(inplace=True) after each add
    x = torch.randn(2, 3, 64, 64)
    gm = trace(model, example=x)
    units = find_units(gm, node_flops(gm, x))
    h = full_form(gm, units[0])(x)
    block = units[1]
    before = h.clone()
    out = skipped_form(gm, block)(h)
    assert_close(h, before)  # the unit's input is untouched
    assert_close(out, torch.relu(before))


def test_flops_of_a_module_that_views_a_parameter():
    from dynconvert.toolkit.costs import count_flops

    class Latent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.latent = torch.nn.Parameter(torch.randn(1, 4, 8))
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.latent.expand(x.shape[0], -1, -1)) + x

    module = Latent()
    assert count_flops(module, torch.randn(3, 4, 8)) == 2 * 4 * 8 * 8
    assert all(p.requires_grad for p in module.parameters())


def test_calibration_out_of_budget_keeps_the_most_accurate_point_and_says_so(caplog):
    """A tuned backbone can miss the budget at every offset: the run keeps going, the report says so."""
    from dynconvert.strategies.block_skip_common import calibrate_bias
    from dynconvert.toolkit.data import ImageSplit, Preprocess

    model, dyn, size = prepared()
    torch.manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (24, 3, size, size), dtype=torch.uint8), torch.arange(24) % 10, "cal")
    overrides = ["model.pretrained=false", "calibrate.max_accuracy_drop=0"]
    recipe = build_recipe(None, "cifar_resnet20", "skipnet", overrides)
    perfect = torch.nn.functional.one_hot(split.labels, 10).float()  # a reference no random network matches
    with caplog.at_level("WARNING"):
        result = calibrate_bias(dyn, split, Preprocess.from_model(model), recipe, [-1.0, 0.0, 1.0], perfect)
    assert result["budget_met"] is False
    assert "no operating point" in caplog.text
    best = min(p["accuracy_drop_bound"] for p in result["sweep"])
    assert result["chosen"]["accuracy_drop_bound"] == best


def test_evaluation_sweep_measures_the_calibration_points_even_with_settled_blocks():
    """Settling fixes blocks at the chosen offset; the sweep's other points are still the ones
    calibration measured, and the settled model is left as it was."""
    from dynconvert.strategies.block_skip_common import calibrate_bias, sweep_points_on_split
    from dynconvert.toolkit.data import ImageSplit, Preprocess

    model, dyn, size = prepared()
    torch.manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (24, 3, size, size), dtype=torch.uint8), torch.arange(24) % 10, "cal")
    recipe = build_recipe(None, "cifar_resnet20", "skipnet", ["model.pretrained=false", "evaluate.sweep_points=3"])
    prep = Preprocess.from_model(model)
    offsets = [-2.0, 0.0, 2.0]
    calibration = calibrate_bias(dyn, split, prep, recipe, offsets)
    chosen = float(dyn.dyn.bias[0])
    dyn.settled = [1] * dyn.num_blocks  # as if every block ran for every calibration image
    points = sweep_points_on_split(dyn, split, prep, recipe, calibration["sweep"])
    assert [p["offset"] for p in points] == offsets
    for point, measured in zip(points, calibration["sweep"]):
        assert point["flops_ratio"] == pytest.approx(measured["flops_ratio"])
    assert len({round(p["flops_ratio"], 6) for p in points}) > 1  # the offsets really differ
    assert dyn.settled == [1] * dyn.num_blocks and float(dyn.dyn.bias[0]) == chosen


@pytest.mark.parametrize("rounds", [0, 1, 3])
def test_refined_calibration_skips_the_blocks_one_offset_could_not(rounds, monkeypatch):
    """Block 0 is needed by every image and its keep-logit is low; the others are not needed.
    One offset cannot skip the others without skipping block 0; a refinement round fixes block 0
    and skips them."""
    from dynconvert.strategies import block_skip_common as common
    from dynconvert.toolkit.data import ImageSplit, Preprocess

    model, dyn, size = prepared()
    n, blocks = 200, dyn.num_blocks
    torch.manual_seed(0)
    logits = torch.rand(n, blocks) * 2 - 1  # blocks 1.. : per image, in [-1, 1)
    logits[:, 0] = 0.5  # block 0: runs at offsets from -0.5
    labels = torch.arange(n) % 10
    split = ImageSplit(torch.zeros(n, 3, 1, 1, dtype=torch.uint8), labels, "cal")

    def route_all(dyn, split, prep, recipe):
        settled = torch.tensor(dyn.settled)
        kept = torch.where(settled == 0, logits + dyn.dyn.bias >= 0, settled > 0)
        return torch.where(kept[:, 0], labels, (labels + 1) % 10), kept

    monkeypatch.setattr(common, "_route_all", route_all)
    recipe = build_recipe(None, "cifar_resnet20", "skipnet", ["model.pretrained=false", "evaluate.sweep_points=2"])
    perfect = torch.nn.functional.one_hot(labels, 10).float()
    prep = Preprocess.from_model(model)
    result = common.calibrate_bias(dyn, split, prep, recipe, [-1.0, 0.0, 1.0], perfect, refine_rounds=rounds)
    chosen = result["chosen"]
    if rounds == 0:
        assert chosen["offset"] == 0.0 and "settled" not in chosen and dyn.settled == [0] * blocks
    else:
        assert chosen["offset"] == -1.0 and chosen["settled"] == [1] + [0] * (blocks - 1)
        assert dyn.settled == chosen["settled"] and dyn.plan["replay"]["settled"] == chosen["settled"]
        assert chosen["accuracy_drop"] == 0.0 and chosen["flops_ratio"] < result["sweep"][1]["flops_ratio"]
        # the round after finds every block constant at that point, and stops
        assert len(result["sweep"]) == 4 + 2  # the chosen offset is not measured twice
    assert float(dyn.dyn.bias[0]) == chosen["offset"]
    points = common.sweep_points_on_split(dyn, split, prep, recipe, result["sweep"])
    measured = {(p["offset"], tuple(p.get("settled", ()))): p["flops_ratio"] for p in result["sweep"]}
    for point in points:  # each point as the calibration measured it, with its own fixed blocks
        assert point["flops_ratio"] == pytest.approx(measured[(point["offset"], tuple(point.get("settled", ())))])
    assert max(p["accuracy"] for p in points) == 1.0  # the most accurate calibration point is among them
    assert dyn.settled == (chosen.get("settled") or [0] * blocks)


def test_gate_returns_add_the_skip_rewards_still_to_come():
    from dynconvert.strategies.skipnet_rl import gate_returns

    kept = torch.tensor([[False, False, True], [True, True, True]])
    returns = gate_returns(torch.tensor([-0.5, -1.0]), kept, torch.tensor([0.1, 0.2, 0.3]), 1.0)
    assert_close(returns, torch.tensor([[-0.2, -0.3, -0.5], [-1.0, -1.0, -1.0]]))


def test_sampled_pass_really_skips_and_scores_its_decisions():
    _, dyn, size = prepared(gate="feedforward")
    dyn.dyn.bias.fill_(-1e4)  # every gate closed: every decision sampled as skip, with log-prob 0
    logits, log_probs, kept = dyn.forward_sampled(torch.randn(3, 3, size, size))
    assert not kept.any() and log_probs.abs().max() < 1e-3
    dyn.dyn.bias.zero_()
    logits, log_probs, kept = dyn.forward_sampled(torch.randn(16, 3, size, size))
    (logits.sum() + log_probs.sum()).backward()
    assert dyn.dyn.controller.gates[0][0].weight.grad is not None
    assert 0 < kept.float().mean() < 1


def test_settled_blocks_follow_their_fixed_decision_without_computing_their_gate(tmp_path):
    _, dyn, size = prepared(gate="feedforward")
    n = dyn.num_blocks
    kept = torch.ones(10, n, dtype=torch.bool)
    kept[:, 0] = False  # never ran on the calibration data
    kept[:5, 1] = False  # ran for some
    dyn.settle(kept)
    assert dyn.settled == [-1, 0] + [1] * (n - 2)
    gate_calls, unit_calls = [], []
    decide = dyn.dyn.controller.decide

    def recording(index, h, state):
        gate_calls.append(index)
        return decide(index, h, state)

    dyn.dyn.controller.decide = recording
    first_block = dyn.droppable.index(True)
    dyn.units[first_block].register_forward_hook(lambda *_: unit_calls.append(1))
    dyn.dyn.bias.fill_(1e4)  # the gates would keep everything
    with torch.no_grad():
        dyn(torch.randn(3, 3, size, size))
    assert gate_calls == [1] and not unit_calls
    assert dyn.last_decisions[:, 0].logical_not().all() and dyn.last_decisions[:, 2:].all()


def test_partial_backbone_tuning_is_saved_and_leaves_the_original_alone(tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    dyn = tiny_skipnet(tiny_data, tiny_weights, out, options__tune_backbone=["layer3.2"], options__backbone_lr=0.01)
    original = torch.load(tiny_weights)
    tuned_unit = dyn.plan["units"].index("layer3.2")
    assert dyn.plan["replay"]["tuned"] == [tuned_unit]
    tuned = dict(dyn.units[tuned_unit].named_parameters())
    assert not torch.equal(tuned["layer3.2.conv1.weight"], original["layer3.2.conv1.weight"])
    assert torch.equal(dict(dyn.units[0].named_parameters())["conv1.weight"], original["conv1.weight"])
    loaded = dynconvert.load(out)
    reloaded = dict(loaded.units[tuned_unit].named_parameters())
    assert torch.equal(reloaded["layer3.2.conv1.weight"], tuned["layer3.2.conv1.weight"])
    assert_same_routes(dyn, loaded)


@pytest.mark.parametrize("pool", [1, 2])
def test_a_gates_decision_outside_inference_is_its_layers(pool):
    from dynconvert.runtime.gates import FeedForwardGates

    torch.manual_seed(0)
    gates = FeedForwardGates([(8, 6, 6), (16, 3, 3)], pool=pool).eval()
    for index, shape in enumerate([(8, 6, 6), (16, 3, 3)]):
        h = torch.randn(1, *shape)
        logit, _ = gates.decide(index, h, None)
        pooled = torch.nn.functional.adaptive_avg_pool2d(h, pool).flatten(1)
        first, _, last = gates.gates[index]
        assert_close(logit, last(torch.relu(first(pooled))).squeeze(1), rtol=0, atol=0)


@pytest.mark.parametrize("pool", [1, 2])
def test_a_gates_batch1_form_under_inference_mode_is_its_decision_and_follows_its_weights(pool):
    from dynconvert.runtime.gates import FeedForwardGates

    torch.manual_seed(0)
    shapes = [(8, 6, 6), (16, 3, 3)]
    gates = FeedForwardGates(shapes, pool=pool).eval()
    hs = [torch.randn(1, *shape) for shape in shapes]
    with torch.inference_mode():
        forms = gates.keep_logit_forms()
        assert forms is not None and gates.keep_logit_forms() is not None
        for index, h in enumerate(hs):
            function, args = forms[index]
            assert function(h, *args).item() == float(gates.decide(index, h, None)[0])
    with torch.no_grad():
        gates.gates[1][0].weight.mul_(3)  # written in place: the next forms see it
    with torch.inference_mode():
        function, args = gates.keep_logit_forms()[1]
        assert function(hs[1], *args).item() == float(gates.decide(1, hs[1], None)[0])
    assert gates.keep_logit_forms() is None, "outside inference mode decide is the way"
