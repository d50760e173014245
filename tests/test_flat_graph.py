"""Flat runners: a traced segment's graph run with one attribute lookup per layer."""

import torch
from torch import fx, nn
from torch.testing import assert_close

from dynconvert.runtime.flat_graph import flat_runner, runners_for


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 0.5))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) * self.scale + x


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = nn.Sequential(Block(), Block())
        self.offset = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.register_buffer("gain", torch.tensor(2.0))

    def forward(self, x):
        return self.stage(x) * self.gain + self.offset


def traced() -> fx.GraphModule:
    torch.manual_seed(0)
    return fx.symbolic_trace(Nested().eval())


def test_runner_computes_what_the_segment_computes_in_one_lookup_per_layer():
    segment = traced()
    runner = flat_runner(segment)
    x = torch.randn(3, 4, 8, 8)
    assert_close(runner(x), segment(x), rtol=0, atol=0)
    assert "getattr(self.stage" in segment.code, "the traced segment reaches layers through containers"
    assert "getattr(" not in runner.code
    assert set(segment.state_dict()) == set(Nested().state_dict()), "the segment keeps its names"


def test_runner_follows_what_happens_to_the_segment():
    segment = traced()
    runner = flat_runner(segment)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    segment.to(torch.float64)  # parameters and buffers replaced, at the root and inside
    assert_close(runner(x), segment(x), rtol=0, atol=0)
    changed = {k: torch.rand_like(v) + 0.5 if v.is_floating_point() else v for k, v in segment.state_dict().items()}
    segment.load_state_dict(changed)
    assert_close(runner(x), segment(x), rtol=0, atol=0)
    # the runner shares the segment's tensors, it holds no copies of them
    shared = {p.data_ptr() for p in segment.parameters()}
    assert {p.data_ptr() for p in runner.parameters()} <= shared


def test_modules_that_are_not_traced_stand_for_themselves():
    plain = nn.Linear(2, 2)
    segment = traced()
    runners = runners_for([plain, segment])
    assert runners[0] is plain and isinstance(runners[1], fx.GraphModule) and runners[1] is not segment


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Identity()

    def forward(self, x):
        return torch.relu(self.conv(x) + self.shortcut(x))


def test_blocks_of_the_same_structure_run_one_function_and_skip_identity_layers():
    torch.manual_seed(0)
    blocks = [fx.symbolic_trace(Residual().eval()) for _ in range(3)]
    runners = runners_for(blocks)
    x = torch.randn(2, 4, 8, 8)
    for block, runner in zip(blocks, runners):
        assert_close(runner(x), block(x), rtol=0, atol=0)
    assert len({type(r).forward for r in runners}) == 1, "one function object for the three blocks' code"
    assert "shortcut" in blocks[0].code and "m1" not in runners[0].code, "the identity shortcut is not called"


def test_an_identity_layer_with_hooks_is_still_called():
    block = fx.symbolic_trace(Residual().eval())
    calls = []
    block.shortcut.register_forward_hook(lambda *_: calls.append(1))
    runner = flat_runner(block)
    runner(torch.randn(1, 4, 8, 8))
    assert calls == [1]
