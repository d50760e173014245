"""The early-exit runtime: an unconverted model equals the original, and exits really skip work."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.testing import assert_close

import dynconvert  # noqa: F401  (registers the CIFAR ResNets)
from dynconvert.runtime.confidence import confidence, row_confidence
from dynconvert.runtime.early_exit import EarlyExitModel
from dynconvert.toolkit.calibrate import simulate_exits

TIGHT = dict(rtol=1e-6, atol=1e-6)
# batched and per-sample convolutions may differ in the last bits
LOOSE = dict(rtol=1e-4, atol=1e-5)

INVARIANCE_MODELS = [
    ("cifar_resnet20", dict(num_classes=3)),
    ("test_resnet", dict(pretrained=False)),
]


@pytest.fixture
def small_dyn(prepare_early_exit):
    """cifar_resnet20 (random, 3 classes) with two exits, and the original model."""
    model = timm.create_model("cifar_resnet20", num_classes=3).eval()
    dyn = prepare_early_exit(model, overrides={"options.fractions": [0.3, 0.6]})
    assert dyn.num_exits == 2
    return dyn, model


def count_calls(dyn: EarlyExitModel) -> dict[str, list[int]]:
    """Record, per sample count, every call of each segment and each exit head."""
    calls: dict[str, list[int]] = {}
    for kind, modules in (("segment", dyn.segments), ("head", dyn.dyn.exits)):
        for k, module in enumerate(modules):
            name = f"{kind}{k}"
            calls[name] = []
            module.register_forward_hook(lambda m, args, out, name=name: calls[name].append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("name,kwargs", INVARIANCE_MODELS, ids=[m for m, _ in INVARIANCE_MODELS])
def test_no_exit_taken_equals_original(name, kwargs, prepare_early_exit):
    model = timm.create_model(name, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dyn = prepare_early_exit(model, name=name)
    assert dyn.num_exits >= 2
    assert torch.all(dyn.dyn.thresholds > 1.0), "initial thresholds must be above any confidence"
    size = model.pretrained_cfg["input_size"]
    for batch in (1, 8):
        x = torch.randn(batch, *size)
        with torch.no_grad():
            expected = model(x)
            routed = dyn.route(x)
            called = dyn(x)
        assert_close(routed.logits, expected, **TIGHT)
        assert_close(called, expected, **TIGHT)
        assert routed.decisions.tolist() == [dyn.num_exits] * batch
        assert dyn.last_decisions.tolist() == [dyn.num_exits] * batch
    # prepare reads the model, it does not change it
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_forward_all_final_logits_equal_original(small_dyn):
    dyn, model = small_dyn
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        final, exit_logits = dyn.forward_all(x)
        expected = model(x)
    assert_close(final, expected, **TIGHT)
    assert [tuple(lg.shape) for lg in exit_logits] == [(4, 3)] * dyn.num_exits


def test_inserted_state_lives_under_dyn_prefix(small_dyn):
    dyn, model = small_dyn
    inserted = {k for k in dyn.state_dict() if k.startswith("dyn.")}
    assert {"dyn.thresholds", "dyn.temperatures"} <= inserted
    assert all(k.startswith("dyn.") for k, _ in dyn.named_parameters() if ".exits." in k)
    backbone = sum(p.numel() for k, p in dyn.named_parameters() if not k.startswith("dyn."))
    assert backbone == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in dyn.dyn.parameters()) > 0


def test_exit_costs_and_static_flops(small_dyn):
    dyn, _ = small_dyn
    assert dyn.exit_costs()[-1] == pytest.approx(dyn.static_flops()), "heads that can't be taken don't run"
    dyn.dyn.thresholds.fill_(0.5)
    costs = dyn.exit_costs()
    assert costs.shape == (dyn.num_exits + 1,)
    assert torch.all(costs[1:] > costs[:-1]), "leaving later must cost more"
    assert costs[-1] == pytest.approx(dyn.static_flops() + sum(dyn.head_flops))
    dyn.dyn.thresholds[0] = 2.0  # the first head turned off: nobody pays for it
    assert dyn.exit_costs()[-1] == pytest.approx(dyn.static_flops() + dyn.head_flops[1])
    # cifar_resnet20: about 41M multiply-accumulates per 32x32 image
    assert 7e7 < dyn.static_flops() < 9e7


@pytest.mark.parametrize("batch", [1, 6])
def test_first_exit_skips_every_later_segment(small_dyn, batch):
    dyn, _ = small_dyn
    dyn.dyn.thresholds.copy_(torch.tensor([0.0, 2.0]))
    calls = count_calls(dyn)
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        routed = dyn.route(x)
        expected = dyn.dyn.exits[0](dyn.segments[0](x))
    assert routed.decisions.tolist() == [0] * batch
    assert_close(routed.logits, expected, **TIGHT)
    assert calls["segment1"] == calls["segment2"] == calls["head1"] == []
    assert calls["segment0"] == [batch, batch]  # once in route, once for `expected`


@pytest.mark.parametrize("batch", [1, 6])
def test_second_exit_skips_the_last_segment(small_dyn, batch):
    dyn, _ = small_dyn
    dyn.dyn.thresholds.copy_(torch.tensor([2.0, 0.0]))
    calls = count_calls(dyn)
    with torch.no_grad():
        routed = dyn.route(torch.randn(batch, 3, 32, 32))
    assert routed.decisions.tolist() == [1] * batch
    assert calls["segment0"] == calls["segment1"] == calls["head1"] == [batch]
    # a head whose threshold is above any confidence is never computed
    assert calls["segment2"] == calls["head0"] == []


def test_hooks_see_every_segment_when_no_exit_is_taken(small_dyn):
    """Positive control for the skipping tests: the hooks do fire."""
    dyn, _ = small_dyn
    dyn.dyn.thresholds.copy_(torch.tensor([1.0, 1.0]))  # reachable in principle, so the heads run
    calls = count_calls(dyn)
    with torch.no_grad():
        routed = dyn.route(torch.randn(3, 3, 32, 32))
    assert routed.decisions.tolist() == [2, 2, 2]
    assert all(calls[name] == [3] for name in ("segment0", "segment1", "segment2", "head0", "head1"))


def _thresholds_for_mixed_exits(dyn: EarlyExitModel, x: torch.Tensor) -> torch.Tensor:
    """Thresholds with which half the batch leaves at exit 0, half the rest at exit 1.

    Each threshold lies midway between two confidences, far from any sample, so that
    batch-size-dependent rounding cannot flip a decision.
    """
    with torch.no_grad():
        _, exit_logits = dyn.forward_all(x)
    conf = torch.stack([confidence(lg / t, dyn.criterion) for lg, t in zip(exit_logits, dyn.dyn.temperatures.tolist())])
    remaining = torch.ones(x.shape[0], dtype=torch.bool)
    thresholds = []
    for k in range(dyn.num_exits):
        values = conf[k][remaining].sort().values
        middle = len(values) // 2
        assert values[middle] - values[middle - 1] > 1e-4, "confidences too close for a robust test"
        threshold = float(values[middle - 1] + values[middle]) / 2
        thresholds.append(threshold)
        remaining &= conf[k] < threshold
    return torch.tensor(thresholds)


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_mixed_exits_batched_equals_per_sample(small_dyn, criterion):
    dyn, _ = small_dyn
    dyn.criterion = criterion
    dyn.dyn.temperatures.copy_(torch.tensor([1.5, 0.7]))
    x = torch.randn(16, 3, 32, 32)
    dyn.dyn.thresholds.copy_(_thresholds_for_mixed_exits(dyn, x))
    with torch.no_grad():
        batched = dyn.route(x)
        single = [dyn.route(x[i : i + 1]) for i in range(len(x))]
    assert torch.bincount(batched.decisions, minlength=3).tolist() == [8, 4, 4]
    assert batched.decisions.tolist() == [int(s.decisions) for s in single]
    assert_close(batched.logits, torch.cat([s.logits for s in single]), **LOOSE)


def test_samples_that_stay_keep_the_channels_last_layout(small_dyn):
    """The rows gathered after an exit stay channels-last, so no segment pays a layout conversion."""
    dyn, _ = small_dyn
    x = torch.randn(16, 3, 32, 32)
    dyn.dyn.thresholds.copy_(_thresholds_for_mixed_exits(dyn, x))
    dyn = dyn.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    layouts = []
    for segment in dyn.segments[1:]:
        segment.register_forward_pre_hook(
            lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    with torch.no_grad():
        batched = dyn.route(x)
        single = [dyn.route(x[i : i + 1]) for i in range(len(x))]
    assert torch.bincount(batched.decisions, minlength=3).tolist() == [8, 4, 4]
    assert layouts[:2] == [True, True]  # the 8, then the 4 samples still in
    assert_close(batched.logits, torch.cat([s.logits for s in single]), **LOOSE)


@pytest.mark.parametrize("batch_size", [3, 16, 64])
def test_stream_mode_equals_per_sample_routing(small_dyn, batch_size):
    """route_stream regroups the samples still in into full batches: same logits and exits as alone."""
    dyn, _ = small_dyn
    x = torch.randn(16, 3, 32, 32)
    dyn.dyn.thresholds.copy_(_thresholds_for_mixed_exits(dyn, x))
    calls = count_calls(dyn)
    with torch.no_grad():
        streamed = dyn.route_stream(x, batch_size=batch_size)
    # 16 samples in, 8 leave at exit 0 and 4 at exit 1: each segment runs in batches of at most batch_size
    assert sum(calls["segment1"]) == 8 and sum(calls["segment2"]) == 4
    if batch_size >= 8:
        assert calls["segment1"] == [8], "the 8 samples still in run as one batch"
    assert all(n <= batch_size for n in calls["segment0"] + calls["segment1"] + calls["segment2"])
    with torch.no_grad():
        single = [dyn.route(x[i : i + 1]) for i in range(len(x))]
    assert streamed.decisions.tolist() == [int(s.decisions) for s in single]
    assert_close(streamed.logits, torch.cat([s.logits for s in single]), **LOOSE)


def test_mixed_exits_match_the_all_exits_reference(small_dyn):
    """route(x) equals computing every exit (forward_all) and taking the first confident one."""
    dyn, _ = small_dyn
    x = torch.randn(16, 3, 32, 32)
    dyn.dyn.thresholds.copy_(_thresholds_for_mixed_exits(dyn, x))
    calls = count_calls(dyn)
    with torch.no_grad():
        routed = dyn.route(x)
    assert calls["segment0"] == [16] and calls["segment1"] == [8] and calls["segment2"] == [4]
    with torch.no_grad():
        final, exit_logits = dyn.forward_all(x)
    conf = torch.stack([confidence(lg, dyn.criterion) for lg in exit_logits])
    expected_exits = simulate_exits(conf, dyn.dyn.thresholds)
    assert routed.decisions.tolist() == expected_exits.tolist()
    all_logits = torch.stack([*exit_logits, final])
    assert_close(routed.logits, all_logits[expected_exits, torch.arange(16)], **LOOSE)


def test_exit_points_chosen_by_module_name(prepare_early_exit):
    model = timm.create_model("cifar_resnet20", num_classes=3)
    dyn = prepare_early_exit(model, overrides={"options.points": ["layer2.0", "layer1"]})
    # graph order, whatever the order in the recipe; a stage name means its last block
    assert dyn.plan["exit_modules"] == ["layer1.2", "layer2.0"]
    fractions = dyn.plan["exit_flops_fractions"]
    assert 0 < fractions[0] < fractions[1] < 1


def test_eval_forward_runs_in_inference_mode(small_dyn):
    """A converted model in eval mode keeps no autograd state, whatever the caller's grad mode."""
    dyn, _ = small_dyn
    dyn.eval()
    x = torch.randn(2, 3, 32, 32)
    out = dyn(x)
    assert out.is_inference() and not out.requires_grad
    dyn.train()
    try:
        assert not dyn(x).is_inference(), "training mode keeps autograd"
    finally:
        dyn.eval()


def test_runs_under_torch_compile(small_dyn):
    """Graph breaks at each decision, same outputs (aot_eager: no C++ compiler needed)."""
    dyn, _ = small_dyn
    x = torch.randn(6, 3, 32, 32)
    dyn.dyn.thresholds.copy_(_thresholds_for_mixed_exits(dyn, torch.randn(16, 3, 32, 32)))
    expected, expected_exits = dyn(x), dyn.last_decisions
    torch._dynamo.reset()
    compiled = torch.compile(dyn, backend="aot_eager")
    assert_close(compiled(x), expected, **TIGHT)
    assert torch.equal(dyn.last_decisions, expected_exits)
    assert_close(compiled(x[:1]), dyn.route(x[:1]).logits, **LOOSE)
    torch._dynamo.reset()


@pytest.mark.parametrize("criterion", ["max_softmax", "entropy"])
def test_batch_one_confidence_in_python_equals_the_tensor_one(criterion):
    torch.manual_seed(0)
    logits = torch.randn(50, 10) * 4
    for temperature in (0.5, 1.0, 2.5):
        expected = confidence(logits / temperature, criterion)
        got = torch.tensor([row_confidence(row.tolist(), temperature, criterion) for row in logits])
        assert_close(got, expected, rtol=0, atol=1e-6)


def test_runs_flat_runners_of_the_segments_it_holds_now(small_dyn):
    dyn, model = small_dyn
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(dyn(x), model(x), **TIGHT)
        runners = dyn.runners()
        assert all(r is not s and "getattr(" not in r.code for r, s in zip(runners, dyn.segments))
        assert dyn.runners() == runners, "built once"
        last = dyn.segments[-1]
        dyn.segments[-1] = copy.deepcopy(last)
        dyn.segments[-1].get_parameter(next(n for n, _ in last.named_parameters())).data.mul_(3)
        assert dyn.runners()[-1] is not runners[-1], "a replaced segment gets a runner of its own"
        assert_close(dyn(x), dyn.segments[-1](dyn.segments[1](dyn.segments[0](x))), **TIGHT)


def test_an_exit_skips_the_later_layers_in_the_flat_runners_too(small_dyn):
    dyn, _ = small_dyn
    dyn.dyn.thresholds.copy_(torch.tensor([0.0, 2.0]))
    calls = []
    for k, segment in enumerate(dyn.segments):
        for layer in segment.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.register_forward_hook(lambda *_, k=k: calls.append(k))
    with torch.no_grad():
        dyn(torch.randn(3, 3, 32, 32))
        dyn(torch.randn(1, 3, 32, 32))
    assert calls and set(calls) == {0}


@pytest.fixture
def batchnorm_dyn(prepare_early_exit):
    """cifar_resnet20 with two exits whose heads fold (BatchNorm, ReLU): the fast batch-1 form."""
    model = timm.create_model("cifar_resnet20", num_classes=3).eval()
    overrides = {
        "options.fractions": [0.3, 0.6],
        "options.head_norm": "batch",
        "options.head_activation": "relu",
        "options.head_hidden": 8,
    }
    dyn = prepare_early_exit(model, overrides=overrides)
    torch.manual_seed(0)
    for head in dyn.dyn.exits:
        norm = head.classifier[0]
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    return dyn.eval()


def route_without_fast_forms(dyn: EarlyExitModel, x: torch.Tensor) -> torch.Tensor:
    """The logits of ``route`` with every head called as a module (outside inference mode)."""
    with torch.no_grad():
        return dyn.route(x).logits


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batch1_fast_heads_equal_the_batched_route(batchnorm_dyn, memory_format):
    dyn = batchnorm_dyn.to(memory_format=memory_format)
    x = torch.randn(16, 3, 32, 32).contiguous(memory_format=memory_format)
    dyn.dyn.thresholds.copy_(_thresholds_for_mixed_exits(dyn, x))
    with torch.inference_mode():
        batched = dyn.route(x)
        single = [dyn.route(x[i : i + 1]) for i in range(len(x))]
    held, forms = dyn._single_sample
    assert held is not None and len(held[0]) == dyn.num_exits, "the heads' single-sample forms were reused"
    assert all(function is not head for (function, _), head in zip(forms, dyn.dyn.exits))
    assert torch.bincount(batched.decisions, minlength=3).tolist() == [8, 4, 4]
    assert batched.decisions.tolist() == [int(s.decisions) for s in single]
    assert_close(batched.logits, torch.cat([s.logits for s in single]), **LOOSE)


def test_batch1_fast_heads_follow_writes_loads_hooks_and_copies(batchnorm_dyn):
    dyn = batchnorm_dyn
    dyn.dyn.thresholds.fill_(0.0)  # every sample leaves at the first exit
    head = dyn.dyn.exits[0]
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        first = dyn.route(x).logits
    assert_close(first, route_without_fast_forms(dyn, x), **TIGHT)

    with torch.no_grad():
        head.classifier[1].weight.mul_(2)  # written in place
    with torch.inference_mode():
        written = dyn.route(x).logits
    assert not torch.allclose(written, first)
    assert_close(written, route_without_fast_forms(dyn, x), **TIGHT)

    copied = copy.deepcopy(dyn)
    state = {k: v * 0.5 for k, v in head.state_dict().items() if v.is_floating_point()}
    with torch.inference_mode():
        head.load_state_dict(state, strict=False)  # under inference mode: no version is left behind
        loaded = dyn.route(x).logits
        from_copy = copied.route(x).logits
    assert not torch.allclose(loaded, written)
    assert_close(loaded, route_without_fast_forms(dyn, x), **TIGHT)
    assert_close(from_copy, written, **TIGHT)

    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.inference_mode():
        dyn.route(x)
    assert calls == [1]
