"""The CIFAR ResNets dynconvert registers in timm's registry."""

from __future__ import annotations

import pytest
import timm
import torch

import dynconvert  # noqa: F401  (registers the CIFAR ResNets)

DEPTHS = (20, 32, 44, 56, 110)
# parameters of the 10-class models (He et al. 2016, table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M)
PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.73}


def test_all_depths_are_registered():
    assert set(timm.list_models("cifar_resnet*")) >= {f"cifar_resnet{d}" for d in DEPTHS}


@pytest.mark.parametrize("depth", DEPTHS)
def test_pretrained_cfg_and_size(depth):
    model = timm.create_model(f"cifar_resnet{depth}")
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 10 and cfg["classifier"] == "linear"
    blocks = (depth - 2) // 6
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [blocks] * 3
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS_M[depth]


def test_cifar_resnet56_forward_and_data_config():
    from timm.data import resolve_data_config

    model = timm.create_model("cifar_resnet56").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    config = resolve_data_config({}, model=model)
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 1.0


def test_num_classes_and_classifier():
    model = timm.create_model("cifar_resnet20", num_classes=3)
    assert model.num_classes == 3
    assert model.get_classifier().out_features == 3
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_shortcut_option_a_has_no_parameters():
    model = timm.create_model("cifar_resnet20")
    block = model.layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(1, 16, 32, 32)
    y = block.shortcut(x)
    assert y.shape == (1, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2]) and not y[:, :8].any() and not y[:, 24:].any()


def test_checkpoint_key_names():
    keys = set(timm.create_model("cifar_resnet20").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer3.2.conv2.weight", "layer1.0.bn2.bias", "linear.bias"} <= keys
