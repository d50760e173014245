"""Graph analyses and passes: cut points, the exit-head pass, splitting into segments."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.testing import assert_close

import dynconvert  # noqa: F401  (registers the CIFAR ResNets)
from dynconvert.passes import exit_points_of, find_cut_points, insert_exit_heads, split_at
from dynconvert.runtime.heads import ExitHead
from dynconvert.toolkit.costs import node_flops
from dynconvert.toolkit.trace import trace


def traced(name: str, **kwargs):
    model = timm.create_model(name, **kwargs).eval()
    example = torch.randn(2, *model.pretrained_cfg["input_size"])
    gm = trace(model, (), example)
    return model, gm, example


def test_cut_points_of_cifar_resnet20_are_block_ends_in_order():
    _, gm, example = traced("cifar_resnet20", num_classes=3)
    points = find_cut_points(gm, node_flops(gm, example))
    expected = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)][:-1]  # not the classifier's input
    assert [p.name for p in points] == expected
    fractions = [p.flops_fraction for p in points]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] < 1
    assert points[0].shape == (16, 32, 32) and points[3].shape == (32, 16, 16)
    assert "layer1" in points[2].modules  # the end of a stage is named by the stage too


def test_segments_compose_to_the_original():
    model, gm, example = traced("cifar_resnet20", num_classes=3)
    segments = split_at(gm, ["relu_6", "relu_12"])
    assert len(segments) == 3
    x = torch.randn(3, 3, 32, 32)
    h = x
    with torch.no_grad():
        for segment in segments:
            h = segment(h)
        assert_close(h, model(x), rtol=1e-6, atol=1e-6)
    assert h.shape == (3, 3)


def test_insert_exit_heads_returns_the_exit_outputs():
    model, gm, example = traced("cifar_resnet20", num_classes=3)
    heads = [ExitHead((16, 32, 32), 3), ExitHead((32, 16, 16), 3)]
    gm = insert_exit_heads(gm, ["relu_6", "relu_12"], heads)
    assert exit_points_of(gm) == ["relu_6", "relu_12"]
    assert gm.get_submodule("dyn.exits.1") is heads[1]
    with torch.no_grad():
        final, *exits = gm(example)
        assert_close(final, model(example))
    assert [e.shape for e in exits] == [(2, 3), (2, 3)]


def test_insert_exit_heads_names_a_missing_node():
    _, gm, _ = traced("cifar_resnet20", num_classes=3)
    with pytest.raises(ValueError, match="no_such_node"):
        insert_exit_heads(gm, ["no_such_node"], [ExitHead((16, 32, 32), 3)])


def test_vit_blocks_are_cut_points():
    _, gm, example = traced("test_vit", pretrained=False)
    names = [p.name for p in find_cut_points(gm, node_flops(gm, example))]
    assert {"blocks.0", "blocks.1"} <= set(names)


def test_exit_heads_read_channels_last_features():
    from dynconvert.passes.analysis import is_channels_last

    assert is_channels_last((8, 8, 96))  # Swin between stages: (H, W, C)
    assert not is_channels_last((64, 8, 8))  # a CNN: (C, H, W)
    assert not is_channels_last((197, 192))  # ViT tokens
    head = ExitHead((8, 8, 96), 10, pool=2, channels_last=True)
    x = torch.randn(2, 8, 8, 96)
    expected = torch.nn.functional.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), 2).flatten(1)
    torch.testing.assert_close(head.features(x), expected)
