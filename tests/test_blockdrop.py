"""BlockDrop: invariance, real skipping, sub-batches, reward and curriculum, save/load, recipes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import TINY_RUN
from torch.testing import assert_close

import dynconvert
from dynconvert.errors import DynconvertError
from dynconvert.recipe import build_recipe, default_recipe_name, strategy_config
from dynconvert.strategies import get_strategy
from dynconvert.strategies.blockdrop_training import (
    blockdrop_reward,
    bounded_probs,
    curriculum_schedule,
    decided_mask,
    fit_corrections,
    offset_for_flops,
    reinforce_step,
)
from dynconvert.toolkit.data import ConversionData, ImageSplit, Preprocess


def prepared(name="cifar_resnet20", overrides=()):
    model = timm.create_model(name, pretrained=False).eval()
    recipe = build_recipe(None, name, "blockdrop", ["model.pretrained=false", *overrides])
    strategy = get_strategy("blockdrop")
    config = strategy_config(recipe)
    dyn = strategy(config).prepare([model], recipe, torch.randn(2, 3, 32, 32), 10)
    return model, dyn, config


def randomize_policy(dyn, seed=3):
    torch.manual_seed(seed)
    for p in dyn.dyn.controller.parameters():
        torch.nn.init.normal_(p, std=0.5)


@pytest.mark.parametrize("batch", [1, 6])
def test_untrained_policy_keeps_every_block_and_equals_the_original(batch):
    model, dyn, _ = prepared()
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        assert_close(dyn(x), model(x))
    assert dyn.last_decisions.shape == (batch, 9) and dyn.last_decisions.all()


@pytest.mark.parametrize("batch", [1, 6])
def test_policy_forced_to_keep_everything_equals_the_original(batch):
    model, dyn, _ = prepared()
    randomize_policy(dyn)
    dyn.dyn.bias.fill_(1e4)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        assert_close(dyn(x), model(x))
        assert_close(dyn.route_with(x, torch.ones(batch, dyn.num_blocks, dtype=torch.bool)).logits, model(x))
    assert dyn.last_decisions.all()


def test_policy_reads_a_downsampled_image_and_costs_little(monkeypatch):
    _, dyn, _ = prepared("cifar_resnet56")
    policy = dyn.dyn.controller
    seen = []
    conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, *a, **k: seen.append(x.shape) or conv2d(x, *a, **k))
    with torch.no_grad():
        dyn(torch.randn(3, 3, 32, 32))
    assert seen[0] == (3, 3, 16, 16)  # the policy runs first, on the downsampled image
    assert policy.head.out_features == dyn.num_blocks == 27
    assert 0 < dyn.inserted_flops() < 0.03 * dyn.static_flops()


def test_dropped_blocks_really_do_not_run():
    _, dyn, _ = prepared()
    calls = {i: 0 for i in range(len(dyn.units))}
    for i, unit in enumerate(dyn.units):
        unit.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    dyn.dyn.bias.fill_(-1e4)
    with torch.no_grad():
        dyn(torch.randn(4, 3, 32, 32))
        dyn(torch.randn(1, 3, 32, 32))
    for i, droppable in enumerate(dyn.droppable):
        assert calls[i] == (0 if droppable else 2)
    assert not dyn.last_decisions.any()
    assert float(dyn.sample_flops(dyn.last_decisions)[0]) < 0.2 * dyn.static_flops()


def test_route_with_runs_each_block_on_exactly_the_rows_that_keep_it():
    _, dyn, _ = prepared()
    rows = {}
    for i, unit in enumerate(dyn.units):
        unit.register_forward_hook(lambda m, args, out, i=i: rows.setdefault(i, []).append(args[0].shape[0]))
    keep = torch.rand(5, dyn.num_blocks, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        dyn.route_with(torch.randn(5, 3, 32, 32), keep)
    block_units = [i for i, d in enumerate(dyn.droppable) if d]
    for j, i in enumerate(block_units):
        assert rows.get(i, [0]) == [int(keep[:, j].sum())]  # never called when no row keeps it


def test_sub_batches_equal_running_each_sample_alone():
    _, dyn, _ = prepared()
    randomize_policy(dyn)
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        for offset in torch.linspace(-3, 3, 25):  # find a bias that gives mixed decisions
            dyn.dyn.bias.fill_(float(offset))
            batched = dyn.route(x)
            if 0.2 < batched.decisions.float().mean() < 0.8:
                break
        assert 0 < batched.decisions.float().mean() < 1, "the test needs mixed decisions"
        assert_close(dyn.route_with(x, batched.decisions).logits, batched.logits)
        for i in range(len(x)):
            alone = dyn.route(x[i : i + 1])
            assert torch.equal(alone.decisions[0], batched.decisions[i])
            assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=1e-5)
        dyn.settled[0], dyn.settled[1] = 1, -1  # settled blocks: the same at batch 1 and in a batch
        batched = dyn.route(x)
        assert batched.decisions[:, 0].all() and not batched.decisions[:, 1].any()
        for i in range(len(x)):
            alone = dyn.route(x[i : i + 1])
            assert torch.equal(alone.decisions[0], batched.decisions[i])
            assert_close(alone.logits[0], batched.logits[i], atol=1e-5, rtol=1e-5)
        dyn.settled = [1] * dyn.num_blocks  # every block settled: the policy is not run at batch 1
        dyn.dyn.controller.start = lambda images: pytest.fail("the policy ran")
        assert dyn.route(x[:1]).decisions.all()


def test_reward_and_probability_bounding():
    correct = torch.tensor([True, True, False, True])
    ratio = torch.tensor([1.0, 0.5, 0.3, 0.0], dtype=torch.float64)
    assert blockdrop_reward(correct, ratio, 5.0).tolist() == [0.0, 0.75, -5.0, 1.0]
    assert blockdrop_reward(torch.tensor([False]), torch.tensor([0.1]), 10.0).tolist() == [-10.0]
    probs = bounded_probs(torch.tensor([-1e4, 0.0, 1e4]), 0.8)
    assert_close(probs, torch.tensor([0.2, 0.5, 0.8]))
    assert_close(bounded_probs(torch.tensor([2.0]), 1.0), torch.sigmoid(torch.tensor([2.0])))


def test_curriculum_hands_the_last_blocks_to_the_policy_first():
    assert curriculum_schedule(9, 3) == [3, 6, 9]
    assert curriculum_schedule(27, 2) == [14, 27]  # more blocks than stages: several per stage
    assert curriculum_schedule(4, 6) == [1, 2, 3, 4, 4, 4]  # the paper: one block per stage
    assert curriculum_schedule(9, 6, per_stage=2) == [2, 4, 6, 8, 9, 9]
    assert curriculum_schedule(5, 3, per_stage=1) == [2, 4, 5]  # never leaves blocks undecided at the end
    assert curriculum_schedule(5, 1) == [5]
    assert decided_mask(5, 2).tolist() == [False, False, False, True, True]
    assert decided_mask(3, 0).tolist() == [False, False, False]
    assert decided_mask(3, 7).tolist() == [True, True, True]


def test_reinforce_step_forces_undecided_blocks_on_and_learns_only_the_decided_ones(monkeypatch):
    _, dyn, config = prepared()
    dyn.dyn.controller.train()
    executed = []
    route_with = dyn.route_with
    monkeypatch.setattr(dyn, "route_with", lambda x, keep: executed.append(keep.clone()) or route_with(x, keep))
    for p in [*dyn.units.parameters(), *dyn.skipped_units.parameters()]:
        p.requires_grad_(False)
    mask = decided_mask(dyn.num_blocks, 2)
    loss, _, stats = reinforce_step(dyn, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), config, mask)
    loss.backward()
    (keep,) = executed  # sampled and greedy actions run in one batch
    assert keep.shape == (32, dyn.num_blocks)
    assert keep[:, :-2].all() and keep[16:].all()  # forced blocks, and the greedy policy, keep everything
    grad = dyn.dyn.controller.head.weight.grad
    assert grad[:-2].abs().sum() == 0 and grad[-2:].abs().sum() > 0
    assert -5.0 <= stats["reward"] <= 1.0 and 0 < stats["flops_ratio"] <= 1.1


def random_split(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageSplit(images, torch.randint(0, 10, (n,), generator=g), "random")


# the CIFAR recipe's policy (one block after a stride-2 stem), and three stages, whose second and
# third blocks fold a projection shortcut
POLICY_SHAPES = [[], ["options.widths=[16, 32, 64]", "options.stem_stride=1"]]


def policy_like(policy):
    """A new policy network of the same shape as ``policy``."""
    widths = [block.conv2.out_channels for block in policy.stages]
    stem_stride = 4 if len(policy.stem) > 3 else policy.stem[0].stride[0]
    return type(policy)(policy.head.out_features, input_size=policy.input_size, widths=widths, stem_stride=stem_stride)


@pytest.mark.parametrize("shape", POLICY_SHAPES)
def test_the_eval_policy_with_batchnorm_folded_equals_the_unfolded_one(shape):
    _, dyn, _ = prepared("cifar_resnet56", shape)
    policy = dyn.dyn.controller
    randomize_policy(dyn)
    for bn in [m for m in policy.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        unfolded = policy.head(policy.stages(policy.stem(small)).mean((2, 3)))
        folded = policy.logits(x)
    with torch.inference_mode():
        cached, again = policy.logits(x), policy.logits(x)
    assert_close(folded, unfolded, rtol=1e-4, atol=1e-4)
    assert torch.equal(cached, folded) and torch.equal(again, folded)
    with torch.no_grad():  # a change to the weights reaches the cached folding
        policy.stem[0].weight.mul_(2.0)
    with torch.inference_mode():
        assert not torch.equal(policy.logits(x), cached)
    # so does a state loaded into a policy built under inference mode, whose tensors keep no version
    with torch.no_grad():
        expected = policy.logits(x)
    with torch.inference_mode():
        rebuilt = policy_like(policy).eval()
        rebuilt.logits(x)
        rebuilt.load_state_dict(policy.state_dict())
        assert_close(rebuilt.logits(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", POLICY_SHAPES)
def test_the_folded_policy_gives_the_same_logits_in_either_layout_and_batch_size(shape):
    _, dyn, _ = prepared("cifar_resnet56", shape)
    policy = dyn.dyn.controller.eval()
    randomize_policy(dyn)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        expected = policy.head(policy.stages(policy.stem(small)).mean((2, 3)))
    with torch.inference_mode():
        batched = policy.logits(x)
        alone = torch.cat([policy.logits(x[i : i + 1]) for i in range(len(x))])
        channels_last = policy.logits(x.contiguous(memory_format=torch.channels_last))
    for logits in (batched, alone, channels_last):
        assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_eval_forward_runs_in_inference_mode_and_training_keeps_autograd():
    _, dyn, _ = prepared()
    x = torch.randn(1, 3, 32, 32)
    out = dyn.eval()(x)
    assert out.is_inference() and not out.requires_grad
    with torch.inference_mode():  # already on: the same result, no context entered again
        assert torch.equal(dyn(x), out)
    dyn.train()
    assert not dyn(torch.randn(2, 3, 32, 32)).is_inference(), "training mode keeps autograd"


def test_corrections_are_fitted_to_the_greedy_policy_at_the_flops_target(monkeypatch):
    overrides = ["options.correction_epochs=1", "train.batch_size=8", "data.batch_size=8"]
    model, dyn, config = prepared(overrides=overrides)
    recipe = build_recipe(None, "cifar_resnet20", "blockdrop", ["model.pretrained=false", *overrides])
    prep = Preprocess.from_model(model)
    randomize_policy(dyn)
    split = random_split(16)
    data = ConversionData(split, split, split, 10, [str(i) for i in range(10)])
    offset = offset_for_flops(dyn, split, prep, recipe, config.correction_flops_ratio)
    before = {k: v.clone() for k, v in dyn.state_dict().items()}
    executed = []
    route_with = dyn.route_with
    monkeypatch.setattr(dyn, "route_with", lambda x, keep: executed.append(keep.clone()) or route_with(x, keep))
    history, used = fit_corrections(dyn, data, prep, recipe, config)
    assert used == offset and [h["phase"] for h in history] == ["corrections"]
    # the runs it learns from are the greedy policy's at that offset: at most the target's FLOPs
    ratio = float(torch.cat([dyn.sample_flops(k) for k in executed]).mean()) / dyn.static_flops()
    assert 0.5 < ratio <= config.correction_flops_ratio + 1e-9
    changed = {k for k, v in dyn.state_dict().items() if not torch.equal(v, before[k])}
    # the skipped forms hold the same correction modules, under their own names
    assert changed and all(k.startswith("dyn.corrections.") or ".skip_correction." in k for k in changed)


def test_options_are_validated():
    with pytest.raises(DynconvertError, match="options.alpha"):
        build_recipe(None, "cifar_resnet20", "blockdrop", ["options.alpha=0.3"])
    with pytest.raises(DynconvertError, match="options.stem_stride"):
        build_recipe(None, "cifar_resnet20", "blockdrop", ["options.stem_stride=3"])
    with pytest.raises(DynconvertError, match="options.gamma"):
        build_recipe(None, "cifar_resnet20", "blockdrop", ["options.gamma=-1"])
    with pytest.raises(DynconvertError, match="unknown recipe key 'options.gate'"):
        build_recipe(None, "cifar_resnet20", "blockdrop", ["options.gate=recurrent"])
    with pytest.raises(DynconvertError, match="finetune_modules"):
        prepared(overrides=["options.tune_backbone=[layer3]"])
    assert default_recipe_name("cifar_resnet56", "blockdrop") == "cifar_resnet-blockdrop"
    assert default_recipe_name("resnet50", "blockdrop") == "resnet50-blockdrop"
    recipe = build_recipe(None, "resnet50", "blockdrop")
    assert recipe.data.eval_split == "validation"
    assert strategy_config(recipe).input_size == 112


def tiny_conversion(tiny_data, tiny_weights, out, **options):
    return dynconvert.convert(
        "cifar_resnet20",
        strategy="blockdrop",
        data=str(tiny_data),
        out=out,
        model__weights=str(tiny_weights),
        train__epochs=2,
        options__calibration_offsets=[-2.0, 0.0, 2.0],
        **TINY_RUN,
        options__curriculum_stage_steps=1,
        **{f"options__{k}": v for k, v in {"correction_epochs": 1, **options}.items()},
    )


def assert_same_decisions(dyn, loaded):
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        a, b = dyn.route(x), loaded.route(x)
    assert torch.equal(a.decisions, b.decisions)
    assert_close(a.logits, b.logits)


def test_tiny_conversion_round_trip(tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    dyn = tiny_conversion(tiny_data, tiny_weights, out)
    report = json.loads((out / "report.json").read_text())
    assert report["strategy"] == "blockdrop"
    for key in ("blocks_used_mean", "block_execution_rate", "distinct_policies", "blocks_used_histogram"):
        assert key in report["dynamic"]
    assert 0 < report["flops_ratio"] < 1.1
    history = report["calibration"]["train"]
    # 3 steps an epoch, a stage a step: 2, 4, 6 blocks decided in the first epoch, 8, 9, 9 in the second
    assert [h["decided_blocks"] for h in history[:2]] == [6, 9]
    assert [h.get("phase") for h in history] == ["curriculum", "curriculum", "corrections"]
    loaded = dynconvert.load(out)
    assert "tuned" not in dict(loaded.dyn.named_children())
    assert_same_decisions(dyn, loaded)


def test_joint_fine_tuning_round_trip_keeps_the_original_network(tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    dyn = tiny_conversion(tiny_data, tiny_weights, out, finetune_epochs=1, finetune_modules=["layer3.2"])
    report = json.loads((out / "report.json").read_text())
    phases = [h["phase"] for h in report["calibration"]["train"]]
    assert phases == ["curriculum", "curriculum", "corrections", "finetune"]
    original = torch.load(tiny_weights)
    tuned_unit = dyn.plan["units"].index("layer3.2")
    assert dyn.plan["replay"]["tuned"] == [tuned_unit]
    tuned = dict(dyn.units[tuned_unit].named_parameters())
    assert not torch.equal(tuned["layer3.2.conv1.weight"], original["layer3.2.conv1.weight"])
    stem = dict(dyn.units[0].named_parameters())
    assert torch.equal(stem["conv1.weight"], original["conv1.weight"])
    loaded = dynconvert.load(out)
    assert_same_decisions(dyn, loaded)


def test_resnet50_recipe_smoke(tiny_imagenet_style_data, tmp_path):
    out = tmp_path / "out"
    dynconvert.convert(
        "resnet50",
        strategy="blockdrop",
        data=str(tiny_imagenet_style_data),
        out=out,
        model__pretrained=False,
        model__num_classes=3,
        train__epochs=1,
        train__batch_size=8,
        data__batch_size=8,
        evaluate__latency_samples=1,
        options__calibration_offsets=[0.0],
    )
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["evaluation"] == "validation"
    assert report["evaluated_samples"] == 6
    assert report["plan"]["droppable"].count(True) == 16
    assert 0 < report["flops_ratio"] <= 1.05
    assert report["inserted_flops"] < 0.02 * report["static"]["flops"]
