"""The feature_info fallback: exits on stage ends, run from hooks, when the graph has no cut point."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import dynconvert
from dynconvert.runtime.stage_exits import StageExitModel

LOOSE = dict(rtol=1e-4, atol=1e-5)


def _stage(channels: int) -> nn.Sequential:
    return nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
            for _ in range(2)
        ]
    )


class Tangled(nn.Module):
    """The batch size, read from the input, stays alive to the end: no point where one tensor is alive.

    Declares its stages as timm models do, in ``feature_info``.
    """

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.Sequential(_stage(8), _stage(8), _stage(8))
        self.fc = nn.Linear(8, num_classes)
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
        self.feature_info = [dict(module=f"stages.{i}", num_chs=8, reduction=1) for i in range(3)]

    def forward(self, x):
        batch = x.shape[0]
        x = self.stages(self.stem(x))
        return self.fc(x.mean((2, 3)).reshape(batch, -1))


def _prepared(prepare_early_exit):
    torch.manual_seed(0)
    model = Tangled().eval()
    dyn = prepare_early_exit(model, overrides={"options.fractions": [0.2, 0.5, 0.8]})
    return dyn, model


def test_graph_without_cut_points_falls_back_to_stages_and_says_so(prepare_early_exit, caplog):
    with caplog.at_level("WARNING"):
        dyn, _ = _prepared(prepare_early_exit)
    assert isinstance(dyn, StageExitModel)
    assert dyn.plan["insertion"].startswith("feature_info fallback")
    assert "feature_info" in caplog.text
    assert dyn.num_exits >= 2
    assert set(dyn.points) <= {f"stages.{i}.{j}" for i in range(3) for j in range(2)}
    assert abs(sum(dyn.segment_flops) - dyn.static_flops()) < 1e-6 * dyn.static_flops()


def test_no_exit_taken_equals_original(prepare_early_exit):
    dyn, model = _prepared(prepare_early_exit)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert_close(dyn.route(x).logits, model(x), rtol=1e-6, atol=1e-6)
            final, exits = dyn.forward_all(x)
        assert_close(final, model(x), rtol=1e-6, atol=1e-6)
        assert len(exits) == dyn.num_exits and exits[0].shape == (batch, 4)


def test_exit_stops_the_backbone(prepare_early_exit):
    dyn, _ = _prepared(prepare_early_exit)
    last_stage_calls = []
    dyn.backbone.stages[2].register_forward_hook(lambda m, a, o: last_stage_calls.append(a[0].shape[0]))
    dyn.dyn.thresholds.fill_(0.0)  # every sample leaves at the first exit
    with torch.no_grad():
        routed = dyn.route(torch.randn(3, 3, 16, 16))
    assert routed.decisions.tolist() == [0, 0, 0]
    assert last_stage_calls == [], "the backbone ran on after every sample had exited"


def test_batch_routing_equals_per_sample_routing(prepare_early_exit):
    dyn, _ = _prepared(prepare_early_exit)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        _, exit_logits = dyn.forward_all(x)
        conf = torch.stack([lg.softmax(1).max(1).values for lg in exit_logits])
        dyn.dyn.thresholds.copy_(conf.median(1).values)  # a mix of exits
        batched = dyn.route(x)
        single = [dyn.route(x[i : i + 1]) for i in range(len(x))]
    assert len(set(batched.decisions.tolist())) > 1
    assert batched.decisions.tolist() == [s.decisions.item() for s in single]
    assert_close(batched.logits, torch.cat([s.logits for s in single]), **LOOSE)


def test_save_load_round_trip(prepare_early_exit, tmp_path):
    dyn, model = _prepared(prepare_early_exit)
    with torch.no_grad():
        for head in dyn.dyn.exits:
            for p in head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    dyn.dyn.thresholds.fill_(0.5)
    # the recipe the model was prepared with, so the heads rebuilt on loading are the same
    dyn.recipe = dynconvert.build_recipe(
        model="cifar_resnet20", overrides={"model.pretrained": False, "options.fractions": [0.2, 0.5, 0.8]}
    )
    dyn.base_info = {"num_classes": 4}
    dynconvert.save(dyn, tmp_path / "saved")
    loaded = dynconvert.load(tmp_path / "saved", model=model)
    assert isinstance(loaded, StageExitModel) and loaded.points == dyn.points
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        a, b = dyn.route(x), loaded.route(x)
    assert torch.equal(a.decisions, b.decisions)
    assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_onnx_export_refuses_the_hooked_form_with_a_clear_error(prepare_early_exit, tmp_path):
    dyn, _ = _prepared(prepare_early_exit)
    with pytest.raises(dynconvert.DynconvertError, match="feature_info fallback"):
        dynconvert.export_onnx(dyn, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
