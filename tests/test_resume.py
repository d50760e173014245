"""Checkpoints: a run stopped by SIGTERM resumes to the report of an uninterrupted run; a damaged
checkpoint, one of another recipe, and a NaN loss each stop with one clear line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, convert_tiny

import dynconvert
from dynconvert.cli import main
from dynconvert.toolkit import checkpoint as ckpt
from dynconvert.toolkit import train

# (strategy, overrides, checkpoint saves before SIGTERM): the blockdrop run stops in its
# third stage (joint fine-tuning), so resuming crosses two finished stages into another
CASES = {
    "early-exit": ({"train__epochs": 3, "options__fractions": [0.3, 0.6]}, 1),
    "skipnet": ({"train__epochs": 2}, 1),
    "blockdrop": ({"train__epochs": 2, "options__correction_epochs": 1, "options__finetune_epochs": 2}, 4),
}
UNSTABLE = ("seconds", "latency")


def convert(strategy, data, weights, out, **kwargs):
    overrides, _ = CASES[strategy]
    return convert_tiny(strategy, data, weights, out, **overrides, **kwargs)


def stable_report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return {k: v for k, v in report.items() if k not in UNSTABLE}


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def sigterm_after_saves(monkeypatch, saves: int) -> list[str]:
    """Send this process SIGTERM right after checkpoint number ``saves``; return the saves' descriptions."""
    done: list[str] = []
    original = ckpt.Checkpointer.save

    def save(self, progress, sum_totals=False):
        original(self, progress, sum_totals)
        done.append(self.saved)
        if len(done) == saves:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ckpt.Checkpointer, "save", save)
    return done


def record_begins(monkeypatch) -> list[tuple[str, int, int, int]]:
    """Record (stage, epochs, epoch, batch) where each training stage starts."""
    begun = []
    original = ckpt.Checkpointer.begin

    def begin(self, name, epochs, *args, **kwargs):
        progress = original(self, name, epochs, *args, **kwargs)
        begun.append((name, epochs, progress.epoch, progress.batch))
        return progress

    monkeypatch.setattr(ckpt.Checkpointer, "begin", begin)
    return begun


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tiny_weights, tmp_path_factory):
    """strategy -> output folder of a run that was not interrupted."""
    outs = {}
    for strategy in CASES:
        outs[strategy] = tmp_path_factory.mktemp("uninterrupted") / strategy
        convert(strategy, tiny_data, tiny_weights, outs[strategy])
    return outs


@pytest.mark.parametrize("strategy", list(CASES))
def test_a_run_stopped_by_sigterm_resumes_to_the_same_report(
    strategy, uninterrupted, tiny_data, tiny_weights, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    saves = sigterm_after_saves(monkeypatch, CASES[strategy][1])
    with pytest.raises(ckpt.TrainingInterrupted):
        convert(strategy, tiny_data, tiny_weights, out)
    monkeypatch.undo()
    assert not out.exists(), "an interrupted run writes no output"
    assert (ckpt.work_folder(out) / ckpt.CHECKPOINT).is_file()
    # the signal came after an epoch's checkpoint; the run stopped at the next step, mid-epoch
    assert "batches into epoch" in saves[-1], saves
    begun = record_begins(monkeypatch)
    convert(strategy, tiny_data, tiny_weights, out, resume=True)
    *finished, (stage, epochs, epoch, batch) = begun
    assert all(e == n for _, n, e, _ in finished), "stages the checkpoint had finished are not run again"
    assert (epoch, batch) != (0, 0) and epoch < epochs, f"{stage} restarted at epoch {epoch}, batch {batch}"
    assert stable_report(out) == stable_report(uninterrupted[strategy])
    assert not ckpt.work_folder(out).exists(), "the work folder goes once the outputs are written"


@pytest.fixture
def interrupted(tiny_data, tiny_weights, tmp_path, monkeypatch):
    """An early-exit run to ``tmp_path/out`` stopped by SIGTERM after its first checkpoint."""
    out = tmp_path / "out"
    sigterm_after_saves(monkeypatch, 1)
    with pytest.raises(ckpt.TrainingInterrupted):
        convert("early-exit", tiny_data, tiny_weights, out)
    monkeypatch.undo()
    return out


def cli_argv(data, weights, out, *extra) -> list[str]:
    overrides, _ = CASES["early-exit"]
    sets = [f"{k.replace('__', '.')}={v}" for k, v in {**TINY_RUN, **overrides}.items()]
    argv = ["cifar_resnet20", "--data", str(data), "--weights", str(weights), "--out", str(out), "-q"]
    return argv + [a for s in sets for a in ("--set", s)] + list(extra)


def test_the_cli_resumes_into_a_non_empty_output_without_force(
    interrupted, uninterrupted, tiny_data, tiny_weights, capsys
):
    # the interrupted run was allowed to replace this folder, so resuming it is too
    interrupted.mkdir()
    (interrupted / "stale.txt").write_text("from an earlier run")
    assert main(cli_argv(tiny_data, tiny_weights, interrupted, "--resume")) == 0
    assert not (interrupted / "stale.txt").exists()
    assert stable_report(interrupted) == stable_report(uninterrupted["early-exit"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[: len(b) // 2], "is corrupt or truncated"),
        (lambda b: b"", "is corrupt or truncated"),
        (lambda b: b"not a zip file at all", "is corrupt or truncated"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_a_damaged_checkpoint_is_one_line_and_touches_nothing(
    interrupted, tiny_data, tiny_weights, capsys, damage, message
):
    path = ckpt.work_folder(interrupted) / ckpt.CHECKPOINT
    path.write_bytes(damage(path.read_bytes()))
    before = snapshot(interrupted.parent)
    status = main(cli_argv(tiny_data, tiny_weights, interrupted, "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith("dynconvert: error: checkpoint") and message in err[0] and str(path) in err[0]
    assert snapshot(interrupted.parent) == before


def test_resuming_with_another_recipe_is_refused(interrupted, tiny_data, tiny_weights, capsys):
    before = snapshot(interrupted.parent)
    status = main(cli_argv(tiny_data, tiny_weights, interrupted, "--resume", "--set", "train.lr=0.5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert "written for another recipe" in err[0] and "without --resume" in err[0]
    assert snapshot(interrupted.parent) == before


def test_resuming_needs_an_output_folder(tiny_data, tiny_weights):
    with pytest.raises(dynconvert.DynconvertError, match="needs the output folder"):
        convert("early-exit", tiny_data, tiny_weights, None, resume=True)


def test_a_nan_loss_keeps_the_last_good_checkpoint(uninterrupted, tiny_data, tiny_weights, tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = ckpt.work_folder(out) / ckpt.CHECKPOINT
    original = train.distillation_loss

    def nan_once_checkpointed(*args, **kwargs):
        loss = original(*args, **kwargs)
        return loss * float("nan") if path.exists() else loss

    monkeypatch.setattr(train, "distillation_loss", nan_once_checkpointed)
    with pytest.raises(dynconvert.DynconvertError) as err:
        convert("early-exit", tiny_data, tiny_weights, out)
    message = str(err.value)
    assert "training loss became nan" in message and "\n" not in message
    assert "last good checkpoint (exit heads, after epoch 1 of 3)" in message and str(path.parent) in message
    assert not out.exists()
    kept = torch.load(path, weights_only=True)
    assert kept["progress"]["epoch"] == 1 and kept["stage"] == "exit heads"
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    # with the data fixed, the kept checkpoint carries on to the uninterrupted result
    monkeypatch.undo()
    convert("early-exit", tiny_data, tiny_weights, out, resume=True)
    assert stable_report(out) == stable_report(uninterrupted["early-exit"])
