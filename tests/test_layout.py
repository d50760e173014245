"""The export's layout preparation: identities only where onnxruntime would leave a residual
sum in plain layout, values unchanged, and the sums fused in onnxruntime afterwards."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from dynconvert.errors import DynconvertError
from dynconvert.export.layout import blocked_identity, keep_blocked_layout, prepare_layout
from dynconvert.models.cifar_resnet import CifarResNet
from dynconvert.toolkit.trace import trace


def identities(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is blocked_identity]


class Residuals(nn.Module):
    """Two residual blocks on the input itself, as a segment after an exit receives it."""

    # 16 channels: a multiple of onnxruntime's channel block (8 or 16), so it uses the blocked layout
    def __init__(self, channels: int = 16, in_place: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(4))
        self.in_place = in_place

    def forward(self, x):
        for i in (0, 2):
            out = self.convs[i + 1](F.relu(self.convs[i](x)))
            if self.in_place:  # timm's blocks add the shortcut in place
                out += x
            else:
                out = out + x
            x = F.relu(out)
        return x


def test_cifar_resnet_wraps_only_the_padded_shortcuts():
    torch.manual_seed(0)
    model = CifarResNet(depth=14, num_classes=4).eval()
    gm = trace(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        prepare_layout(gm)
        got = gm(x)
    wrapped = [n.args[0] for n in identities(gm)]
    # two stages start with a subsampling, zero-padding shortcut; the identity shortcuts read
    # the previous block's output, already in the convolutions' layout
    assert len(wrapped) == 2
    assert all(n.target is F.pad for n in wrapped)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("in_place", [False, True])
def test_graph_input_feeding_a_sum_is_wrapped_once_for_all_its_uses(in_place):
    model = Residuals(in_place=in_place).eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = model(x)
        keep_blocked_layout(gm)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    (identity,) = identities(gm)
    assert identity.args[0].op == "placeholder"
    first_conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert first_conv.args[0] is identity  # the convolution shares the converted input


def test_sums_without_convolutions_are_left_alone():
    gm = fx.symbolic_trace(lambda a, b: torch.relu(a + b))
    keep_blocked_layout(gm)
    assert identities(gm) == []


def test_non_map_operands_pass_through():
    assert blocked_identity(torch.ones(2, 3)).shape == (2, 3)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(blocked_identity(x), x)


@pytest.fixture
def ort_ops(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort

    def optimized_ops(module: nn.Module, name: str) -> collections.Counter:
        path, optimized = tmp_path / f"{name}.onnx", tmp_path / f"{name}-optimized.onnx"
        torch.onnx.export(module, (torch.randn(1, 16, 16, 16),), str(path), dynamo=True, verbose=False)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)

    return optimized_ops


def test_onnxruntime_fuses_the_prepared_sums(ort_ops):
    torch.manual_seed(0)
    model = Residuals().eval()
    plain = ort_ops(model, "plain")
    if not plain["ReorderInput"]:
        pytest.skip("onnxruntime uses no blocked layout on this CPU")
    prepared = ort_ops(keep_blocked_layout(fx.symbolic_trace(model)), "prepared")
    assert plain["Add"] == 2  # both sums unfused: the first reads the graph input
    assert prepared["Add"] == 0
    assert prepared["MaxPool"] == 1


def test_export_static_onnx_matches_torch_and_keeps_existing_files(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from dynconvert.export import export_static_onnx

    torch.manual_seed(0)
    model = CifarResNet(depth=8, num_classes=3).eval()
    x = torch.randn(5, 3, 16, 16)
    for prepare in (True, False):
        path = export_static_onnx(model, tmp_path / f"static-{prepare}.onnx", x[:2], prepare=prepare)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"x": x.numpy()})  # batch 5: the batch dimension is dynamic
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=0, atol=1e-4)
    before = path.read_bytes()
    with pytest.raises(DynconvertError, match="exists"):
        export_static_onnx(model, path, x[:2])
    assert path.read_bytes() == before


def test_inputs_known_to_be_blocked_get_no_identity():
    model = Residuals().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = model(x)
        keep_blocked_layout(gm, input_blocked=True)
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)
    assert identities(gm) == []


def test_frozen_copy_folds_full_rank_skip_corrections_only():
    from dynconvert.export.frozen import FoldedCorrection, frozen_copy
    from dynconvert.runtime.corrections import SkipCorrection

    torch.manual_seed(0)
    corrections = nn.ModuleList(
        [SkipCorrection((16, 8, 8)), SkipCorrection((16, 8, 8), rank=4), SkipCorrection((5, 16))]
    )
    for p in corrections.parameters():
        nn.init.normal_(p, std=0.2)
    frozen = frozen_copy(corrections)
    assert isinstance(frozen[0], FoldedCorrection)  # one product, no addition
    assert isinstance(frozen[1], SkipCorrection)  # the factored product stays
    assert isinstance(frozen[2], nn.Linear)
    maps, tokens = torch.randn(3, 16, 8, 8), torch.randn(3, 5, 16)
    with torch.no_grad():
        for original, folded, x in zip(corrections.eval(), frozen, (maps, maps, tokens)):
            torch.testing.assert_close(folded(x), original(x), rtol=0, atol=1e-5)
