"""The coverage check (dynconvert.coverage) on timm's tiny test models, for every registered strategy:
prepare, invariance, one training step, hard decisions and save/load all pass (or the strategy
is not applicable: a block-skipping strategy on a network with no residual block)."""

from __future__ import annotations

import pytest

import dynconvert
from dynconvert.coverage import check_model

BLOCK_SKIPPING = {"skipnet", "blockdrop"}


@pytest.mark.parametrize("strategy", dynconvert.list_strategies())
@pytest.mark.parametrize("model", ["test_resnet", "test_efficientnet", "test_vit"])
def test_insertion_works_on_timm_test_models(model, strategy):
    record = check_model(model, strategy)
    details = f"{record['step']}: {record['reason']} (at {record['where']})"
    if model == "test_efficientnet" and strategy in BLOCK_SKIPPING:  # its blocks have no skip connection
        assert record["result"] == "n/a", details
        return
    assert record["result"] == "pass", details
    assert record["step"] is None
    assert record["details"]["invariance_error"] <= 1e-4
    assert record["details"]["load_error"] <= 1e-5


def test_early_exit_falls_back_to_feature_info_stages_on_coat():
    """CoaT keeps its batch size alive through the whole graph: no cut point, so exits go on its stages."""
    record = check_model("coat_lite_tiny", "early-exit")
    assert record["result"] == "pass", f"{record['step']}: {record['reason']}"
    assert "feature_info stages (fallback)" in record["details"]["inserted"]
    assert record["details"]["invariance_error"] <= 1e-4
