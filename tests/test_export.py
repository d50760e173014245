"""ONNX export keeps the per-sample decisions: every strategy on tiny models, and the check."""

from __future__ import annotations

import collections
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import dynconvert  # noqa: E402
from dynconvert.export.check import check_batches, check_onnx  # noqa: E402
from dynconvert.models.cifar_resnet import CifarResNet  # noqa: E402
from dynconvert.recipe import build_recipe, strategy_config  # noqa: E402
from dynconvert.runtime.confidence import confidence  # noqa: E402
from dynconvert.strategies import get_strategy  # noqa: E402

SIDE = 16  # the CIFAR ResNets pool globally, so a smaller image keeps the tests fast


def tiny(strategy: str, overrides=()):
    """An 8-layer CIFAR ResNet (3 droppable blocks) converted by ``strategy``, untrained."""
    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=3).eval()
    recipe = build_recipe(None, "cifar_resnet20", strategy, ["model.pretrained=false", *overrides])
    strategy_ = get_strategy(strategy)
    dyn = strategy_(strategy_config(recipe)).prepare([model], recipe, torch.randn(2, 3, SIDE, SIDE), 3).eval()
    dyn.recipe = recipe  # what the pipeline records; export asks it for the strategy
    return dyn


def make_decisive(dyn):
    """Random inserted weights, then thresholds (exits, with temperatures other than 1) or
    biases (blocks) at the median of what the samples score, so that decisions split the batch
    (an even number of samples: the median falls between two scores, so no sample sits exactly
    on a threshold)."""
    torch.manual_seed(1)
    for p in dyn.dyn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = images()
    with torch.no_grad():
        if hasattr(dyn.dyn, "thresholds"):
            # temperatures other than 1, as calibration leaves them: the export folds them into the heads
            dyn.dyn.temperatures.copy_(torch.linspace(0.5, 2.0, dyn.num_exits))
            for k, logits in enumerate(dyn.forward_all(x)[1]):
                scaled = logits / dyn.dyn.temperatures[k]
                dyn.dyn.thresholds[k] = confidence(scaled, dyn.criterion).quantile(0.5)
            return dyn
        controller, decide = dyn.dyn.controller, dyn.dyn.controller.decide
        for block in range(dyn.num_blocks):  # earlier biases settle the inputs of later blocks
            seen = {}

            def recording(index, h, state, seen=seen):
                logit, state = decide(index, h, state)
                seen[index] = logit
                return logit, state

            controller.decide = recording
            dyn.route(x)
            del controller.decide
            dyn.dyn.bias[block] = -seen[block].quantile(0.5)
    return dyn


def splits_samples(record: torch.Tensor) -> bool:
    return bool((record != record[:1]).any())


def images(n=80):
    torch.manual_seed(2)
    return torch.randn(n, 3, SIDE, SIDE) * torch.linspace(0.2, 2.0, n).view(-1, 1, 1, 1)


# strategy, recipe overrides, export form (each form once per runtime; cond exports are slower)
CASES = {
    "early-exit": ("early-exit", ["options.fractions=[0.3,0.6]"], "gather"),
    "early-exit-cond": ("early-exit", ["options.fractions=[0.3,0.6]"], "cond"),
    "early-exit-layernorm": (
        "early-exit",
        ["options.fractions=[0.3,0.6]", "options.head_norm=layer", "options.head_activation=gelu"],
        "gather",
    ),
    "skipnet": ("skipnet", ["options.gate=feedforward"], "cond"),
    "skipnet-recurrent": ("skipnet", ["options.gate=recurrent"], "gather"),
    "blockdrop": ("blockdrop", [], "gather"),
    "skipnet-settled": ("skipnet", ["options.gate=feedforward"], "cond"),
}


def decisions_of(dyn, x):
    with torch.no_grad():
        return dyn.route(x).decisions


@pytest.mark.parametrize("case", list(CASES))
def test_export_keeps_decisions_and_passes_the_check(case, tmp_path):
    strategy, overrides, form = CASES[case]
    dyn = make_decisive(tiny(strategy, overrides))
    if case.endswith("-settled"):  # one block never runs, one always does: no gate, no If for them
        dyn.settled[0], dyn.settled[-1] = -1, 1
    x = images()
    record = decisions_of(dyn, x)
    # the decisions must vary across samples, or the test would not test routing
    assert splits_samples(record), f"{case}: every sample decides the same"
    report = dynconvert.export_onnx(dyn, tmp_path / "m.onnx", form=form, images=x, random_inputs=16)
    assert report["passed"] and report["decisions_identical"] and report["form"] == form
    assert report["max_abs_logit_diff"] <= 1e-4
    assert 1 in report["batch_sizes"] and 64 in report["batch_sizes"]
    assert json.loads((tmp_path / "m.onnx.check.json").read_text())["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.check.json"]  # no partial file left

    assert _ifs_on_the_batch_of_one_path(tmp_path / "m.onnx") == _live_decisions(dyn)
    assert _nodes_with_trace_records(tmp_path / "m.onnx") == 0

    from dynconvert.export.check import ort_session

    session = ort_session(tmp_path / "m.onnx")
    logits, decisions = session.run(None, {"x": x[:5].numpy()})
    assert logits.shape == (5, 3)
    assert (torch.from_numpy(decisions) == record[:5]).all()


def test_block_skip_export_runs_every_convolution_in_the_blocked_layout(tmp_path):
    """Skip corrections included: inside an ``If`` branch onnxruntime reorders only weights of
    the branch's own, which the export gives them by writing each as a convolution with a scale
    and shift (as the backbone's frozen BatchNorms are)."""
    import onnx
    import onnxruntime as ort

    dyn = make_decisive(tiny("skipnet", ["options.gate=feedforward"]))
    dyn.settled[0], dyn.settled[-1] = -1, 1  # a block skipped for every sample: its correction runs
    dynconvert.export_onnx(dyn, tmp_path / "m.onnx", form="cond", images=images(), random_inputs=4)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter()

    def count(graph):
        for node in graph.node:
            ops[node.op_type, node.domain] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    count(attribute.g)

    count(onnx.load(str(tmp_path / "optimized.onnx")).graph)
    blocked = ops["Conv", "com.microsoft.nchwc"]
    if not blocked:
        pytest.skip("onnxruntime uses no blocked layout on this CPU")
    plain = sum(n for (op, domain), n in ops.items() if op in ("Conv", "FusedConv") and domain != "com.microsoft.nchwc")
    assert plain == 0, f"{plain} convolutions left in plain layout ({blocked} blocked)"


def test_block_skip_export_prepares_only_the_unit_inputs_that_arrive_in_plain_layout():
    from dynconvert.export.layout import blocked_identity
    from dynconvert.strategies.block_skip_graph import BlockSkipGraph

    dyn = make_decisive(tiny("skipnet", ["options.gate=feedforward"]))
    assert dyn.droppable == [False, True, True, True]  # the stem, then one block per stage

    def first_block_wrapped(settled) -> bool:
        """Whether the first block (identity shortcut: no padded one to prepare) has an identity."""
        dyn.settled = list(settled)
        graph = BlockSkipGraph(dyn, images()[:2], "cond")
        return any(n.target is blocked_identity for n in graph.units[1].graph.nodes)

    # decided per image: its input crosses an If, in plain layout
    assert first_block_wrapped([0, 1, 1])
    # always run: it reads the stem's output, already blocked
    assert not first_block_wrapped([1, 1, 1])


def _live_decisions(dyn) -> int:
    if hasattr(dyn.dyn, "thresholds"):
        return int((dyn.dyn.thresholds <= 1.0).sum())
    return sum(s == 0 for s in dyn.settled)


def _nodes_with_trace_records(path) -> int:
    """Nodes, in any subgraph, that still carry the exporter's stack traces or FX node text."""
    import onnx

    def count(graph) -> int:
        total = 0
        for node in graph.node:
            total += bool(node.metadata_props) or bool(node.doc_string)
            total += sum(count(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
        return total

    return count(onnx.load(str(path)).graph)


def _ifs_on_the_batch_of_one_path(path) -> int:
    """``If`` nodes inside the then-branch of the graph's batch-size ``If``, nested ones included."""
    import onnx

    def count(graph) -> int:
        total = 0
        for node in graph.node:
            if node.op_type == "If":
                total += 1
                total += sum(count(a.g) for a in node.attribute if a.name in ("then_branch", "else_branch"))
        return total

    model = onnx.load(str(path))
    top = [n for n in model.graph.node if n.op_type == "If"]
    assert len(top) == 1, "the graph should branch once on the batch size"
    then_branch = next(a.g for a in top[0].attribute if a.name == "then_branch")
    return count(then_branch)


def test_a_model_whose_decisions_differ_fails_the_check(tmp_path):
    dyn = make_decisive(tiny("early-exit", CASES["early-exit"][1]))
    x = images()
    dynconvert.export_onnx(dyn, tmp_path / "m.onnx", images=x, random_inputs=0)
    dyn.dyn.thresholds += 0.05  # PyTorch now exits later than the export
    with pytest.raises(dynconvert.DynconvertError, match="decisions differ"):
        check_onnx(tmp_path / "m.onnx", dyn, check_batches(x, 0, (3, SIDE, SIDE)))


def test_a_failed_check_writes_no_model(tmp_path, monkeypatch):
    import dynconvert.export.onnx_export as onnx_export

    dyn = make_decisive(tiny("blockdrop"))
    assert splits_samples(decisions_of(dyn, images(16)))

    def skewed(path, model, batches):
        model.dyn.bias.fill_(-1e9)  # every block skipped in PyTorch, not in the export
        return check_onnx(path, model, batches)

    monkeypatch.setattr(onnx_export, "check_onnx", skewed)
    with pytest.raises(dynconvert.DynconvertError, match="does not behave"):
        dynconvert.export_onnx(dyn, tmp_path / "m.onnx", form="gather", images=images(16), random_inputs=0)
    assert not (tmp_path / "m.onnx").exists()
    assert not json.loads((tmp_path / "m.onnx.check.json").read_text())["passed"]


def test_existing_files_are_not_replaced_unless_asked(tmp_path):
    dyn = tiny("skipnet")
    (tmp_path / "m.onnx").write_text("keep me")
    with pytest.raises(dynconvert.DynconvertError, match="exists"):
        dynconvert.export_onnx(dyn, tmp_path / "m.onnx", images=images(4))
    assert (tmp_path / "m.onnx").read_text() == "keep me"
