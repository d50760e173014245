"""Export-friendly forwards of the dynamic models: pure tensor code that returns
(logits, decisions), with per-sample routing expressed as data-dependent gathers and,
where chosen, ``torch.cond``; nothing reads a tensor's value in Python."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dynconvert.export.frozen import frozen_copy
from dynconvert.export.layout import prepare_layout
from dynconvert.runtime.block_skip import BlockSkipModel, walk_units
from dynconvert.runtime.confidence import confidence
from dynconvert.runtime.early_exit import EarlyExitModel

FORMS = ("gather", "cond")


def _check_sub_batch(h: torch.Tensor, rows: torch.Tensor, batch) -> None:
    """Tell torch.export what a ``torch.cond`` output of data-dependent size is: a sub-batch."""
    torch._check(h.shape[0] >= 0)
    torch._check(h.shape[0] <= batch)
    torch._check(rows.shape[0] == h.shape[0])


def _rows(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a 1-D mask, a size torch.export can reason about."""
    rows = mask.nonzero().reshape(-1)  # not squeeze(1): the exported Squeeze fails on empty rows
    torch._check(rows.shape[0] >= 0)
    torch._check(rows.shape[0] <= mask.shape[0])
    return rows


@torch.no_grad()
def _stage_shapes(stages: nn.ModuleList, example: torch.Tensor) -> tuple[list[tuple[int, ...]], int]:
    """Per-sample output shape of each stage, and the number of classes (the last stage's width)."""
    shapes, h = [], example[:1]
    for stage in stages:
        h = stage(h)
        shapes.append(tuple(h.shape[1:]))
    return shapes, shapes[-1][0]


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
        self.stage_shapes, self.num_classes = _stage_shapes(self.stages, example)
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
            _check_sub_batch(h, rows, batch)
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
        gone, stay = _rows(leave), _rows(~leave)
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


class BlockSkipGraph(nn.Module):
    """``forward(x) -> (logits, kept)`` of a :class:`BlockSkipModel`.

    Each droppable block runs in full on the samples that keep it and in its skipped form on
    the rest: with ``form="gather"`` both sub-batches are gathered (``NonZero`` + ``Gather``)
    and scattered back (``ScatterND``); with ``form="cond"`` a ``torch.cond`` first asks whether
    every sample keeps the block (run it on the whole batch) or none does (the skipped form on
    the whole batch), and only a mixed batch pays for the gathers.
    """

    output_names = ("logits", "kept")

    def __init__(self, dyn: BlockSkipModel, example: torch.Tensor, form: str = "gather"):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got '{form}'")
        self.form = form
        self.droppable = list(dyn.droppable)
        self.settled = list(dyn.settled)
        self.units = frozen_copy(dyn.units)
        self.skipped_units = frozen_copy(dyn.skipped_units)
        plain = self._plain_inputs()
        for unit, skipped, plain_input in zip(self.units, self.skipped_units, plain):
            prepare_layout(unit, input_blocked=not plain_input)
            prepare_layout(skipped, input_blocked=not plain_input)
        self.controller = frozen_copy(dyn.dyn.controller)
        self.register_buffer("bias", dyn.dyn.bias.detach().clone())
        self.unit_shapes, _ = _stage_shapes(self.units, example)

    def _plain_inputs(self) -> list[bool]:
        """Per unit, whether its input reaches it in plain layout in the exported graph: the
        graph's input, and every input in or just after a block decided per sample (an ``If``
        branch's input and output, or a gathered sub-batch). Elsewhere a unit reads the blocked
        output of the unit before it, and preparing its input again would cost a copy per block."""
        decided, index = [], 0
        for droppable in self.droppable:
            decided.append(droppable and self.settled[index] == 0)
            index += droppable
        return [i == 0 or decided[i] or decided[i - 1] for i in range(len(decided))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not any(s == 0 for s in self.settled):
            return self._run(x, self._block)
        return torch.cond(
            x.shape[0] == 1,
            lambda x: self._run(x, self._one_sample_block),
            lambda x: self._run(x, self._block),
            (x,),
        )

    def _run(self, x: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
        h, kept = walk_units(
            x,
            self.units,
            self.skipped_units,
            self.droppable,
            self.settled,
            self.controller,
            self.bias,
            lambda i, score, h: (block(i, h, score), score >= 0),
        )
        if not kept:
            return h, x.new_zeros((x.shape[0], 0), dtype=torch.bool)
        return h, torch.stack(kept, 1)

    def _one_sample_block(self, i: int, h: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Batch of one: a single ``If`` runs the block or its skipped form."""
        full, skipped = self.units[i], self.skipped_units[i]
        return torch.cond(score >= 0, lambda h: full(h), lambda h: skipped(h), (h,))

    def _block(self, i: int, h: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        full, skipped, shape = self.units[i], self.skipped_units[i], self.unit_shapes[i]

        def mixed(h, score):
            keep = score >= 0
            rows_kept, rows_skipped = _rows(keep), _rows(~keep)
            out = h.new_zeros((h.shape[0], *shape))
            out = out.index_copy(0, rows_kept, full(h.index_select(0, rows_kept)))
            return out.index_copy(0, rows_skipped, skipped(h.index_select(0, rows_skipped)))

        if self.form == "gather":
            return mixed(h, score)

        # min/max of the scores rather than all()/any() of the decisions: no casts of booleans
        def some_or_none(h, score):
            return torch.cond(score.max() >= 0, mixed, lambda h, score: skipped(h), (h, score))

        return torch.cond(score.min() >= 0, lambda h, score: full(h), some_or_none, (h, score))
