"""Skip corrections: a learned linear map of the shortcut where a skipped block's branch was."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import convert_tiny
from torch.testing import assert_close

import dynconvert
from dynconvert.recipe import build_recipe, strategy_config
from dynconvert.runtime.corrections import SkipCorrection, pointwise_conv
from dynconvert.strategies import get_strategy
from dynconvert.toolkit.costs import count_flops


def prepared(strategy: str, correction: str):
    torch.manual_seed(0)
    model = timm.create_model("cifar_resnet20", pretrained=False).eval()
    overrides = ["model.pretrained=false", f"options.skip_correction={correction}"]
    recipe = build_recipe(None, "cifar_resnet20", strategy, overrides)
    return get_strategy(strategy)(strategy_config(recipe)).prepare([model], recipe, torch.randn(2, 3, 32, 32), 10)


def closed(dyn):
    dyn.dyn.bias.fill_(-1e4)
    return dyn


def correction_weights(dyn) -> list[torch.Tensor]:
    return [m.map.weight.detach().clone() for m in dyn.dyn.corrections.values()]


def test_an_untrained_correction_is_the_plain_shortcut_and_is_counted():
    plain, corrected = prepared("skipnet", "none"), prepared("skipnet", "linear")
    assert not hasattr(plain.dyn, "corrections")
    assert len(corrected.dyn.corrections) == corrected.num_blocks
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(closed(corrected)(x), closed(plain)(x))
    # what skipping saves shrinks by the correction's cost: 2 x C x C x H x W (+ bias) per block
    block = corrected.droppable.index(True)
    h = corrected.units[0](x[:1])
    extra = count_flops(corrected.skipped_units[block], h) - count_flops(plain.skipped_units[block], h)
    assert extra == pytest.approx(2 * 16 * 16 * 32 * 32, rel=0.1)
    assert corrected.skipped_flops[block] - plain.skipped_flops[block] == pytest.approx(extra)


def test_a_skipped_block_runs_its_correction_and_the_correction_changes_the_output():
    dyn = closed(prepared("skipnet", "linear"))
    calls = []
    for module in dyn.dyn.corrections.values():
        module.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = dyn(x)
        for module in dyn.dyn.corrections.values():
            torch.nn.init.normal_(module.map.weight, std=0.1)
        after = dyn(x)
    assert len(calls) == 2 * dyn.num_blocks
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("shape,conv", [((16, 8, 8), True), ((8, 8, 96), False), ((197, 192), False)])
def test_correction_maps_channels_of_each_layout(shape, conv):
    from dynconvert.passes.analysis import is_channels_last

    correction = SkipCorrection(shape, channels_last=is_channels_last(shape))
    assert isinstance(correction.map, torch.nn.Conv2d) == conv
    x = torch.randn(2, *shape)
    assert torch.equal(correction(x), x)  # an untrained correction is the plain shortcut


def tiny(strategy, tiny_data, tiny_weights, out, **options):
    return convert_tiny(
        strategy,
        tiny_data,
        tiny_weights,
        out,
        train__epochs=1,
        options__calibration_offsets=[-2.0, 0.0, 2.0],
        **{f"options__{k}": v for k, v in options.items()},
    )


@pytest.mark.parametrize("strategy", ["skipnet", "blockdrop"])
def test_corrections_learn_and_are_saved(strategy, tiny_data, tiny_weights, tmp_path):
    blockdrop = {"curriculum_stage_steps": 1, "correction_epochs": 1, "finetune_epochs": 1}
    options = blockdrop if strategy == "blockdrop" else {}
    dyn = tiny(strategy, tiny_data, tiny_weights, tmp_path / "out", **options)
    learned = correction_weights(dyn)
    assert any(w.abs().sum() > 0 for w in learned), "training left every correction at zero"
    for i, module in dyn.dyn.corrections.items():  # the skipped forms call the saved modules
        assert dyn.skipped_units[int(i)].skip_correction is module
    loaded = dynconvert.load(tmp_path / "out")
    for a, b in zip(learned, correction_weights(loaded)):
        assert torch.equal(a, b)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(closed(dyn)(x), closed(loaded)(x))


def test_wide_shortcuts_get_a_factored_correction_within_a_twelfth_of_the_branch():
    from dynconvert.runtime.corrections import correction_rank

    # a CIFAR BasicBlock (16 channels, 32x32): two 3x3 convolutions, so a full map fits
    basic_branch = 2 * (2 * 16 * 16 * 9 * 32 * 32)
    assert correction_rank((16, 32, 32), False, basic_branch) is None
    # a ResNet-50 layer4 bottleneck (2048 -> 512 -> 512 -> 2048 at 7x7): a full map would cost as much
    bottleneck_branch = 2 * (2048 * 512 + 512 * 512 * 9 + 512 * 2048) * 49
    rank = correction_rank((2048, 7, 7), False, bottleneck_branch)
    assert rank is not None and 1 <= rank < 2048
    correction = SkipCorrection((2048, 7, 7), rank=rank)
    assert count_flops(correction, torch.randn(1, 2048, 7, 7)) <= bottleneck_branch / 12 * 1.01
    x = torch.randn(1, 2048, 7, 7)
    assert torch.equal(correction(x), x)


@pytest.mark.parametrize("shape", [(16, 8, 8), (8, 8, 96), (197, 192)])
def test_the_eval_correction_folds_the_skip_into_one_product(shape):
    from dynconvert.passes.analysis import is_channels_last

    correction = SkipCorrection(shape, channels_last=is_channels_last(shape)).eval()
    torch.nn.init.normal_(correction.map.weight, std=0.1)
    torch.nn.init.normal_(correction.map.bias, std=0.1)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        expected = x + correction.map(x)
    with torch.inference_mode():
        folded = correction(x)
        assert correction.cached_folding() is not None
    assert_close(folded, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a change to the weights reaches the cached folding
        correction.map.weight.mul_(2.0)
        expected = x + correction.map(x)
    with torch.inference_mode():
        assert_close(correction(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_pointwise_conv_is_the_1x1_convolution_in_the_input_layout(batch, layout):
    torch.manual_seed(0)
    x = torch.randn(batch, 16, 8, 8).contiguous(memory_format=layout)
    weight, bias = torch.randn(16, 16, 1, 1), torch.randn(16)
    with torch.inference_mode():
        out = pointwise_conv(x, weight, bias)
    assert_close(out, torch.nn.functional.conv2d(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=layout)
