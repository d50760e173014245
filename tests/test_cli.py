"""The command line, in-process: exit status, messages on stderr, and what lands in --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from dynconvert.cli import main

TINY = [
    "--set", "model.pretrained=false",
    "--set", "model.num_classes=3",
    "--set", "train.epochs=1",
    "--set", "train.batch_size=32",
    "--set", "data.batch_size=32",
    "--set", "evaluate.latency_samples=4",
    "--set", "options.fractions=[0.3, 0.6]",
    "-q",
]  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def cli_out(tiny_data, tiny_weights, tmp_path_factory):
    """One conversion through the CLI: (exit status, argv, output folder)."""
    out = tmp_path_factory.mktemp("cli") / "out"
    argv = ["cifar_resnet20", "--data", str(tiny_data), "--weights", str(tiny_weights), "--out", str(out), *TINY]
    return main(argv), argv, out


def test_conversion_succeeds_and_writes_the_outputs(cli_out):
    status, _, out = cli_out
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "cifar_resnet20" and report["strategy"] == "early-exit"
    assert report["evaluated_samples"] == 48
    assert (out / "report.png").is_file() and (out / "recipe.yaml").is_file()
    assert (out / "model" / "dynamic.safetensors").is_file()


def test_existing_output_is_kept_without_force(cli_out, capsys):
    _, argv, out = cli_out
    before = snapshot(out)
    status, stdout, stderr = run(argv, capsys)
    assert status == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dynconvert: error:") and "--force" in lines[0] and str(out) in lines[0]
    assert snapshot(out) == before


def test_force_replaces_the_output(cli_out, capsys):
    _, argv, out = cli_out
    stray = out / "stray.txt"
    stray.write_text("left from an earlier run")
    before = (out / "report.json").stat().st_mtime_ns
    status, stdout, _ = run([*argv, "--force"], capsys)
    assert status == 0
    assert "cifar_resnet20 early-exit: accuracy" in stdout and str(out) in stdout
    assert not stray.exists()
    assert (out / "report.json").stat().st_mtime_ns != before
    assert json.loads((out / "report.json").read_text())["evaluated_samples"] == 48


def test_unknown_model_suggests_a_name(tiny_data, tmp_path, capsys):
    status, _, stderr = run(["cifar_resnet21", "--data", str(tiny_data), "--out", str(tmp_path / "o"), *TINY], capsys)
    assert status == 2
    assert "unknown model 'cifar_resnet21'" in stderr and "did you mean" in stderr and "cifar_resnet20" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_weights_that_do_not_fit_name_the_keys(tiny_data, tmp_path, capsys):
    state = timm.create_model("cifar_resnet20", num_classes=3).state_dict()
    state["fc.bias"] = state.pop("linear.bias")
    weights = tmp_path / "wrong.pt"
    torch.save(state, weights)
    argv = ["cifar_resnet20", "--data", str(tiny_data), "--weights", str(weights), "--out", str(tmp_path / "o"), *TINY]
    status, _, stderr = run(argv, capsys)
    assert status == 2
    assert "missing keys linear.bias" in stderr and "unexpected keys fc.bias" in stderr
    assert str(weights) in stderr


def test_bad_override_fails_before_anything_is_written(tiny_data, tmp_path, capsys):
    out = tmp_path / "o"
    status, _, stderr = run(
        ["cifar_resnet20", "--data", str(tiny_data), "--out", str(out), "--set", "train.epoch=3"], capsys
    )
    assert status == 2
    assert "'train.epoch'" in stderr and "epochs" in stderr
    assert not out.exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    status, _, stderr = run(["cifar_resnet20", "--out", str(tmp_path / "o"), *TINY], capsys)
    assert status == 2
    assert "no data set given" in stderr and "--data" in stderr


def test_debug_shows_the_exception(tiny_data, tmp_path):
    from dynconvert.errors import DynconvertError

    with pytest.raises(DynconvertError, match="unknown strategy"):
        main(["cifar_resnet20", "--data", str(tiny_data), "--strategy", "nope", "--debug", "--out", str(tmp_path)])


def test_quiet_hides_the_progress_bars(tiny_data, tmp_path, monkeypatch):
    from dynconvert import progress

    seen = []
    monkeypatch.setattr(progress, "tqdm", lambda *args, **kwargs: seen.append(kwargs.get("disable")) or iter(()))
    progress.set_quiet(True)
    progress.progress_bar(range(3))
    progress.set_quiet(False)
    progress.progress_bar(range(3))  # not quiet: tqdm's own default (TQDM_DISABLE in this test session)
    assert seen == [True, None]
    quiet_during_run = []
    monkeypatch.setattr("dynconvert.cli.set_quiet", lambda quiet: quiet_during_run.append(quiet))
    main(["cifar_resnet20", "--data", str(tiny_data), "--strategy", "nope", "--out", str(tmp_path), "-q"])
    assert quiet_during_run == [True, False]  # on while it runs, off again after


@pytest.mark.parametrize("strategy", ["early-exit", "skipnet", "blockdrop", "cascade", "resolution"])
def test_list_options_shows_every_option_with_its_default_and_help(strategy, capsys):
    import dataclasses

    from dynconvert.strategies import get_strategy

    assert main(["--list-options", strategy]) == 0
    out = capsys.readouterr().out
    config = get_strategy(strategy).config_class
    for field in dataclasses.fields(config):
        assert f"options.{field.name}" in out
        assert field.metadata.get("help"), f"{strategy}: options.{field.name} has no help text"


def test_no_model_is_a_clear_error(capsys):
    assert main([]) == 2
    assert "name the model to convert" in capsys.readouterr().err
