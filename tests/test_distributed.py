"""The conversion under torchrun: two CPU processes (gloo) share every global batch and reach
the single-process result; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RUN

import dynconvert
from dynconvert.toolkit import distributed

CASES = {
    # LayerNorm heads: BatchNorm heads normalise with each process's half of the batch
    "early-exit": {
        "train__epochs": 2,
        "options__fractions": [0.3, 0.6],
        "options__head_norm": "layer",
        "options__head_activation": "gelu",
    },
    # joint fine-tuning: blocks a rank's share never runs get no gradient there
    "blockdrop": {"train__epochs": 1, "options__correction_epochs": 1, "options__finetune_epochs": 1},
}


def torchrun(strategy: str, data, weights, out) -> subprocess.CompletedProcess:
    sets = [f"{k.replace('__', '.')}={v}" for k, v in {**TINY_RUN, **CASES[strategy]}.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "dynconvert", "cifar_resnet20", "--strategy", strategy, "--data", str(data)]
    command += ["--weights", str(weights), "--out", str(out), "-q", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


def single(strategy: str, data, weights) -> dict:
    dyn = dynconvert.convert(
        "cifar_resnet20",
        strategy=strategy,
        data=str(data),
        model__weights=str(weights),
        **TINY_RUN,
        **CASES[strategy],
    )
    return json.loads(json.dumps(dyn.report, default=str))


@pytest.mark.parametrize("strategy", list(CASES))
def test_two_processes_match_one(strategy, tiny_data, tiny_weights, tmp_path):
    out = tmp_path / "out"
    run = torchrun(strategy, tiny_data, tiny_weights, out)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("written to") == 1, "rank 0 alone prints the summary"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no work or staging folder is left"
    report = json.loads((out / "report.json").read_text())
    expected = single(strategy, tiny_data, tiny_weights)
    # the backbone and the evaluation are untouched by training
    assert report["static"] == expected["static"]
    assert without_settled(report["plan"]) == without_settled(expected["plan"])
    if strategy == "early-exit":
        # exit heads have no batch statistics: the gradient of the sharded batch is the
        # gradient of the whole batch, up to the order of float additions
        assert report["calibration"]["train_loss"] == pytest.approx(expected["calibration"]["train_loss"], rel=1e-5)
        assert report["calibration"]["temperatures"] == pytest.approx(expected["calibration"]["temperatures"], rel=1e-4)
        assert report["dynamic"]["accuracy"] == pytest.approx(expected["dynamic"]["accuracy"], abs=1 / 48)
        assert report["flops_ratio"] == pytest.approx(expected["flops_ratio"], abs=0.05)
    else:
        # a policy network's BatchNorm sees half a batch per process, and each process samples
        # its own actions: the same kind of run, not the same numbers
        phases = [(r["phase"], r["epoch"]) for r in report["calibration"]["train"]]
        assert phases == [(r["phase"], r["epoch"]) for r in expected["calibration"]["train"]]
        # at most the whole network plus the policy network (every block kept)
        ceiling = 1.0 + report["inserted_flops"] / report["static"]["flops"]
        assert 0.0 < report["flops_ratio"] <= ceiling + 1e-6
        # which blocks settle follows from the trained policy's decisions, so it is of the
        # same kind: one fixed decision (or none) per block
        settled = report["plan"]["replay"]["settled"]
        assert len(settled) == len(expected["plan"]["replay"]["settled"])
        assert set(settled) <= {-1, 0, 1}


def without_settled(plan: dict) -> dict:
    """The plan without the blocks settled after calibration: those come from training, the
    rest from the graph and the recipe alone."""
    if "replay" not in plan:
        return plan
    return {**plan, "replay": {k: v for k, v in plan["replay"].items() if k != "settled"}}


def test_a_single_process_is_left_alone(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is False
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    index = torch.arange(7)
    assert distributed.shard(index) is index
    assert distributed.smallest_shard(7) == 7
    assert distributed.sum_over_ranks({"loss": 2.5}) == {"loss": 2.5}
