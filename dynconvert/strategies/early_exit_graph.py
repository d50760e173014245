"""Early exit's export form: each exit an ``If`` at batch 1, exited samples leaving the batch
through gathers in larger batches."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynconvert.export.frozen import frozen_copy
from dynconvert.export.graphs import FORMS, check_sub_batch, rows_of, stage_shapes
from dynconvert.export.layout import prepare_layout
from dynconvert.runtime.confidence import confidence
from dynconvert.runtime.early_exit import EarlyExitModel


class EarlyExitGraph(nn.Module):
    """``forward(x) -> (logits, exits)`` of an :class:`EarlyExitModel`.

    After each exit head, the samples that leave write their logits into the output and
    leave the batch (``NonZero`` + ``Gather``); the later segments run on the rest only.
    With ``form="cond"`` the rest of the network is also wrapped in ``torch.cond`` on
    "any sample left", so a batch that has fully exited stops there.
    Exits whose threshold is above 1 can never be taken and are left out of the graph.
    """

    output_names = ("logits", "exits")

    def __init__(self, dyn: EarlyExitModel, example: torch.Tensor, form: str = "gather"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got '{form}'")
        self.form = form
        self.criterion = dyn.criterion
        self.num_exits = dyn.num_exits
        thresholds = dyn.dyn.thresholds.tolist()
        temperatures = dyn.dyn.temperatures.tolist()
        # group segments so that each stage ends at a live exit (or at the network's end)
        stages, heads, self.exit_index, current = [], [], [], []
        for k in range(dyn.num_exits):
            current.append(dyn.segments[k])
            if thresholds[k] <= 1.0:
                stages.append(nn.Sequential(*current))
                heads.append(dyn.dyn.exits[k])
                self.exit_index.append(k)
                current = []
        current.append(dyn.segments[-1])
        stages.append(nn.Sequential(*current))
        self.stages = prepare_layout(frozen_copy(nn.ModuleList(stages)))
        # not frozen: a head folds its own BatchNorm into its first layer in eval mode
        self.heads = copy.deepcopy(nn.ModuleList(heads)).eval().requires_grad_(False)
        self.register_buffer("thresholds", torch.tensor([thresholds[k] for k in self.exit_index]))
        self.stage_shapes, self.num_classes = stage_shapes(self.stages, example)
        self.register_buffer("temperatures", torch.tensor([temperatures[k] for k in self.exit_index]))
        for head, temperature in zip(self.heads, self.temperatures.tolist()):
            _divide_output(head, temperature)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.heads:
            return self.stages[0](x), torch.full((x.shape[0],), self.num_exits, dtype=torch.long, device=x.device)
        return torch.cond(x.shape[0] == 1, self._one_sample, self._batched, (x,))

    def _one_sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of one: each exit is an ``If`` whose other branch holds the rest of the network."""
        return self._from_stage(0, x)

    def _from_stage(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stages[i](h)
        if i == len(self.heads):
            return h, torch.full((h.shape[0],), self.num_exits, dtype=torch.long, device=h.device)
        scaled = self.heads[i](h)
        exit_index = self.exit_index[i]
        # a one-element predicate: onnxruntime's If takes it as it is, no Gather of element 0
        return torch.cond(
            self._leaves(i, scaled),
            lambda h, scaled: (
                self._logits(i, scaled),
                torch.full((h.shape[0],), exit_index, dtype=torch.long, device=h.device),
            ),
            lambda h, scaled: self._from_stage(i + 1, h),
            (h, scaled),
        )

    def _batched(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        exits = torch.full((batch,), self.num_exits, dtype=torch.long, device=x.device)
        rows = torch.arange(batch, device=x.device)
        out = x.new_zeros((batch, self.num_classes))
        h, rows, out, exits = self._level(0, x, rows, out, exits)
        for i in range(1, len(self.heads)):
            if self.form == "gather":
                h, rows, out, exits = self._level(i, h, rows, out, exits)
                continue
            h, rows, out, exits = torch.cond(
                h.shape[0] > 0,
                lambda h, rows, out, exits, i=i: self._level(i, h, rows, out, exits),
                lambda h, rows, out, exits, i=i: (
                    h.new_zeros((h.shape[0], *self.stage_shapes[i])),
                    rows.clone(),
                    out.clone(),
                    exits.clone(),
                ),
                (h, rows, out, exits),
            )
            check_sub_batch(h, rows, batch)
        if self.form == "gather":
            return out.index_copy(0, rows, self.stages[-1](h)), exits
        return torch.cond(
            h.shape[0] > 0,
            lambda h, rows, out, exits: (out.index_copy(0, rows, self.stages[-1](h)), exits.clone()),
            lambda h, rows, out, exits: (out.clone(), exits.clone()),
            (h, rows, out, exits),
        )

    def _leaves(self, i: int, scaled: torch.Tensor) -> torch.Tensor:
        """Per sample, whether it leaves at exit ``i``, from the head's logits over its temperature."""
        return confidence(scaled, self.criterion) >= self.thresholds[i]

    def _logits(self, i: int, scaled: torch.Tensor) -> torch.Tensor:
        """The logits themselves, from the scaled ones: computed for the leaving samples only."""
        return scaled * self.temperatures[i]

    def _level(self, i: int, h, rows, out, exits):
        """Stage ``i`` and its exit: leaving samples write their logits and leave the batch."""
        h = self.stages[i](h)
        scaled = self.heads[i](h)
        leave = self._leaves(i, scaled)
        gone, stay = rows_of(leave), rows_of(~leave)
        left = rows.index_select(0, gone)
        out = out.index_copy(0, left, self._logits(i, scaled.index_select(0, gone)))
        exits = exits.index_fill(0, left, self.exit_index[i])
        return h.index_select(0, stay), rows.index_select(0, stay), out, exits


def _divide_output(head: nn.Module, temperature: float) -> None:
    """Make ``head`` return its logits over ``temperature``, by scaling its last linear layer:
    every exit reached then decides without a division, and only the samples that leave
    multiply back."""
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    # new tensors rather than in-place division: a model loaded under inference mode holds
    # inference tensors, which cannot be written outside it
    last.weight = nn.Parameter(last.weight.detach() / temperature, requires_grad=False)
    if last.bias is not None:
        last.bias = nn.Parameter(last.bias.detach() / temperature, requires_grad=False)
    head.eval()  # a head that folds weights forgets what it folded before
