"""Loading local checkpoints: common nestings and prefixes, strict key checks, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import shared_file
from safetensors.torch import save_file

import dynconvert  # noqa: F401  (registers the CIFAR ResNets)
from dynconvert.convert.build import build_model, load_weights
from dynconvert.errors import DynconvertError
from dynconvert.recipe import ModelConfig


@pytest.fixture
def source():
    """A seeded cifar_resnet20 (3 classes) whose weights are to be loaded elsewhere."""
    torch.manual_seed(7)
    model = timm.create_model("cifar_resnet20", num_classes=3)
    with torch.no_grad():  # make the BatchNorm statistics distinguishable from a fresh model's too
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 1.5)
    return model.state_dict()


def fresh(num_classes: int = 3):
    torch.manual_seed(8)
    return timm.create_model("cifar_resnet20", num_classes=num_classes)


def assert_holds(model, state):
    got = model.state_dict()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), key


def _prefixed(state):
    return {f"module.{k}": v for k, v in state.items()}


LAYOUTS = {
    "plain": lambda s: s,
    "state_dict": lambda s: {"state_dict": s, "epoch": 3},
    "model": lambda s: {"model": s, "optimizer": {}},
    "module-prefix": _prefixed,
    "state_dict+module-prefix": lambda s: {"state_dict": _prefixed(s), "best_prec1": 91.7},
    "no-num_batches_tracked": lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_weights_layouts(layout, source, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(LAYOUTS[layout](source), path)
    model = fresh()
    assert not torch.equal(model.state_dict()["conv1.weight"], source["conv1.weight"])
    load_weights(model, path)
    assert_holds(model, source)


def test_load_weights_safetensors(source, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(path))
    model = fresh()
    load_weights(model, path)
    assert_holds(model, source)


def test_build_model_with_weights_is_in_eval_mode(source, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(source, path)
    model = build_model(ModelConfig(name="cifar_resnet20", pretrained=True, num_classes=3, weights=str(path)))
    assert not model.training
    assert_holds(model, source)


def test_keys_that_do_not_fit_are_named_and_nothing_is_loaded(source, tmp_path):
    state = dict(source)
    state["fc.weight"] = state.pop("linear.weight")
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DynconvertError) as err:
        load_weights(model, path)
    message = str(err.value)
    assert "missing keys linear.weight" in message and "unexpected keys fc.weight" in message
    assert str(path) in message
    assert_holds(model, before)  # all or nothing


def test_many_missing_keys_are_summarised(tmp_path):
    path = tmp_path / "resnet32.pt"
    torch.save(timm.create_model("cifar_resnet32", num_classes=3).state_dict(), path)
    with pytest.raises(DynconvertError, match=r"missing keys none; unexpected keys layer1\.3\..*and \d+ more"):
        load_weights(fresh(), path)


def test_wrong_shapes_are_named(source, tmp_path):
    path = tmp_path / "ten-classes.pt"
    torch.save(timm.create_model("cifar_resnet20", num_classes=10).state_dict(), path)
    with pytest.raises(DynconvertError, match=r"'linear\.weight' has shape \(10, 64\).*expects \(3, 64\)"):
        load_weights(fresh(3), path)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"not a checkpoint", "neither a PyTorch checkpoint"),
        ([torch.zeros(2)], "no state dict of tensors"),
        ({"conv1.weight": torch.zeros(2), "note": "text"}, "no state dict of tensors"),
    ],
    ids=["garbage", "list", "non-tensor"],
)
def test_unreadable_weights(content, expected, tmp_path):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(DynconvertError, match=expected):
        load_weights(fresh(), path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_pickled_objects_are_refused_with_a_way_out(tmp_path, legacy):
    """A checkpoint holding more than tensors (here a whole pickled model), in either of
    torch.save's formats, is not unpickled; the error says why and how to extract the state dict."""
    path = tmp_path / "whole-model.pt"
    torch.save(fresh(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(DynconvertError, match=r"holds Python objects besides tensors.*state dict alone"):
        load_weights(fresh(), path)


def test_broken_safetensors_file_is_named(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(DynconvertError, match="not a readable safetensors file"):
        load_weights(fresh(), path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(DynconvertError, match="does not exist"):
        load_weights(fresh(), tmp_path / "nope.pt")


@pytest.mark.parametrize("depth,file", [(20, "resnet20-12fca82f.th"), (56, "resnet56-4bfd9763.th")])
def test_shared_pretrained_checkpoints_load(shared_dir, depth, file):
    """The real CIFAR-10 checkpoints ('state_dict' nesting, 'module.' prefixes) fit the CIFAR ResNets."""
    weights = shared_file(shared_dir, f"models/{file}")
    model = timm.create_model(f"cifar_resnet{depth}")
    load_weights(model, weights)
    raw = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.state_dict()["linear.weight"], raw["module.linear.weight"])


def test_shared_pretrained_resnet20_classifies_cifar10(shared_dir):
    """Pretrained ResNet-20 is accurate on pixel-exact test images: the architecture matches."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    weights = shared_file(shared_dir, "models/resnet20-12fca82f.th")
    data = shared_file(shared_dir, "data/cifar10-lossless/test.parquet")
    model = timm.create_model("cifar_resnet20")
    load_weights(model, weights)
    model.eval()
    table = pq.read_table(data).slice(0, 200).to_pylist()
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB")) for row in table])
    labels = torch.tensor([row["label"] for row in table])
    cfg = model.pretrained_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.85  # 91.5% on all 1,000 images
