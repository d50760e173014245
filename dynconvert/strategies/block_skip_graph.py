"""Block skipping's export form: each block an ``If`` at batch 1 (run it or its skipped form),
sub-batches gathered per block in larger batches."""

from __future__ import annotations

import torch
from torch import nn

from dynconvert.export.frozen import frozen_copy
from dynconvert.export.graphs import FORMS, rows_of, stage_shapes
from dynconvert.export.layout import prepare_layout
from dynconvert.runtime.block_skip import BlockSkipModel, walk_units


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
        self.unit_shapes, _ = stage_shapes(self.units, example)

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
            rows_kept, rows_skipped = rows_of(keep), rows_of(~keep)
            out = h.new_zeros((h.shape[0], *shape))
            out = out.index_copy(0, rows_kept, full(h.index_select(0, rows_kept)))
            return out.index_copy(0, rows_skipped, skipped(h.index_select(0, rows_skipped)))

        if self.form == "gather":
            return mixed(h, score)

        # min/max of the scores rather than all()/any() of the decisions: no casts of booleans
        def some_or_none(h, score):
            return torch.cond(score.max() >= 0, mixed, lambda h, score: skipped(h), (h, score))

        return torch.cond(score.min() >= 0, lambda h, score: full(h), some_or_none, (h, score))
