"""``--export onnx`` after a conversion, and exporting a saved conversion again."""

from __future__ import annotations

import json
import logging

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dynconvert  # noqa: E402
from dynconvert.cli import main  # noqa: E402
from dynconvert.export.check import ort_session  # noqa: E402

TINY = [
    "--set", "model.pretrained=false",
    "--set", "model.num_classes=3",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=32",
    "--set", "data.batch_size=32",
    "--set", "evaluate.latency_samples=2",
    "--set", "options.fractions=[0.3, 0.6]",
    "-q",
]  # fmt: skip


def test_cli_exports_and_checks_beside_the_conversion(tiny_data, tiny_weights, tmp_path, caplog):
    out = tmp_path / "out"
    argv = ["cifar_resnet20", "--data", str(tiny_data), "--weights", str(tiny_weights), "--out", str(out)]
    caplog.set_level(logging.INFO, logger="dynconvert.cli")
    flops_alone = ["--set", "options.head_overhead_mflops=0"]
    assert main([*argv, *TINY, *flops_alone, "--export", "onnx"]) == 0
    # exits priced in FLOPs alone for a model bound for onnxruntime: the user is told how to price them there
    assert "options.latency_runtime=onnxruntime" in caplog.text
    report = json.loads((out / "model.onnx.check.json").read_text())
    assert report["passed"] and report["strategy"] == "early-exit"
    assert report["samples"]["images"] >= 48  # every test image of the tiny data set (some twice)
    assert report["max_abs_logit_diff"] <= 1e-4

    dyn = dynconvert.load(out)
    with pytest.raises(dynconvert.DynconvertError, match="exists"):
        dynconvert.export_onnx(dyn, out / "model.onnx")
    again = dynconvert.export_onnx(dyn, tmp_path / "again.onnx", random_inputs=8)
    assert again["passed"]
    logits, exits = ort_session(tmp_path / "again.onnx").run(None, {"x": _batch(dyn)})
    assert logits.shape == (3, 3) and exits.shape == (3,)


def _batch(dyn):
    import torch

    return torch.randn(3, *dyn.preprocess.input_size).numpy()
