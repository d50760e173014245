"""Gates that decide, block by block, whether a residual block runs (SkipNet / ConvNet-AIG)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.folding import FoldsForInference
from dynconvert.runtime.modules import DynModule


def _pool(h: torch.Tensor, size: int) -> torch.Tensor:
    if h.dim() == 4:
        if size == 1:  # the mean adaptive pooling computes for one output pixel, without the reshapes
            return h.mean((2, 3))
        return F.adaptive_avg_pool2d(h, size).flatten(1)
    return h.mean(1)  # token sequences (B, T, D)


def _channels(shape: tuple[int, ...], pool: int) -> int:
    return shape[0] * pool * pool if len(shape) == 3 else shape[-1]


class FeedForwardGates(FoldsForInference):
    """One small gate per block: pooled input -> Linear -> ReLU -> Linear -> one logit.

    Args:
        input_shapes: per-sample shape of each gated block's input.
        hidden: hidden width of each gate.
        pool: side of the adaptive average pooling of spatial inputs.
    """

    kind = "feedforward"
    independent_decisions = True  # a block's gate needs nothing from the other gates

    def __init__(self, input_shapes: list[tuple[int, ...]], hidden: int = 16, pool: int = 1):
        super().__init__()
        self.pool = pool
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(_channels(s, pool), hidden), nn.ReLU(), nn.Linear(hidden, 1)) for s in input_shapes
        )
        for gate in self.gates:
            nn.init.constant_(gate[-1].bias, 1.0)  # start with every block running, not saturated
        # spatial inputs averaged to one value per channel: in inference the averaging's division
        # folds into the first layer, so the gate sums (one operation instead of two)
        self._positions = [s[1] * s[2] if len(s) == 3 and pool == 1 else None for s in input_shapes]

    def start(self, x: torch.Tensor):
        return None

    def decide(self, index: int, h: torch.Tensor, state):
        """Keep-logit of block ``index`` for each sample of ``h``; state is unused."""
        return self._keep_logits(index, h).squeeze(1), state

    def keep_logit_forms(self) -> list[tuple] | None:
        """Per gate, ``(function, args)`` with ``function(h, *args)`` the keep-logits ``(batch, 1)``
        that :meth:`decide` computes: the gate's operations on its weights (the averaging's
        division folded into the first layer) as one straight-line function, without the module
        lookups around them, which at batch 1 weigh next to the gate's two small products.
        Cached under inference mode while the weights hold (see ``runtime/folding.py``); None
        elsewhere, where :meth:`decide` runs the layers themselves."""
        return self.cached_folding()

    def _fold_sources(self) -> list[torch.Tensor]:
        return list(self.parameters())

    def _fold(self) -> list[tuple]:
        """What :meth:`keep_logit_forms` gives: per gate, its function and weights."""
        forms = []
        for (first, _, last), positions in zip(self.gates, self._positions):
            if positions is None:
                forms.append((_pooled_gate, (self.pool, first.weight, first.bias, last.weight, last.bias)))
            else:
                forms.append((_summed_gate, (first.weight / positions, first.bias, last.weight, last.bias)))
        return forms

    def _keep_logits(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """Gate ``index``'s keep-logits, shape ``(batch, 1)``."""
        forms = self.cached_folding()
        if forms is not None:  # in inference, the same function at every batch size
            function, args = forms[index]
            return function(h, *args)
        first, _, last = self.gates[index]
        # the gate's layers called as functions: three module calls would cost more than its products
        return _pooled_gate(h, self.pool, first.weight, first.bias, last.weight, last.bias)


def _summed_gate(h, weight1, bias1, weight2, bias2) -> torch.Tensor:
    """A feed-forward gate on a spatial map's channel sums, ``weight1`` divided by the positions
    (see :meth:`FeedForwardGates.keep_logit_forms`); the hidden ReLU is taken in place."""
    return F.linear(F.linear(h.sum((2, 3)), weight1, bias1).relu_(), weight2, bias2)


def _pooled_gate(h, pool, weight1, bias1, weight2, bias2) -> torch.Tensor:
    """A feed-forward gate on its pooled input (see :meth:`FeedForwardGates.keep_logit_forms`)."""
    return F.linear(F.linear(_pool(h, pool), weight1, bias1).relu_(), weight2, bias2)


class RecurrentGates(DynModule):
    """One LSTM shared by all blocks, fed a per-block projection of the pooled block input."""

    kind = "recurrent"

    def __init__(self, input_shapes: list[tuple[int, ...]], hidden: int = 16, pool: int = 1, embed: int = 16):
        super().__init__()
        self.pool = pool
        self.hidden = hidden
        self.project = nn.ModuleList(nn.Linear(_channels(s, pool), embed) for s in input_shapes)
        self.cell = nn.LSTMCell(embed, hidden)
        self.out = nn.Linear(hidden, 1)
        nn.init.constant_(self.out.bias, 1.0)

    def start(self, x: torch.Tensor):
        zeros = x.new_zeros((x.shape[0], self.hidden))
        return zeros, zeros

    def decide(self, index: int, h: torch.Tensor, state):
        """Keep-logit of block ``index``; the LSTM state is carried to the next block."""
        state = self.cell(self.project[index](_pool(h, self.pool)), state)
        return self.out(state[0]).squeeze(1), state


GATE_KINDS = {"feedforward": FeedForwardGates, "recurrent": RecurrentGates}
