"""The cascade's export form: ``forward(x) -> (answers, stages)`` in pure tensor code. A batch
of one runs a chain of ``If`` nodes (a confident stage is all that runs); larger batches hand
the unsure samples on as a gathered sub-batch."""

from __future__ import annotations

import torch
from torch import nn

from dynconvert.export.frozen import frozen_copy
from dynconvert.export.graphs import rows_of
from dynconvert.strategies.cascade.model import InputAdapter, stage_answer, stage_confidence


class CascadeGraph(nn.Module):
    """Export form of a ``CascadeModel``: the live stages, their thresholds and temperatures as constants."""

    output_names = ("logits", "stages")

    def __init__(self, dyn, example: torch.Tensor):
        super().__init__()
        self.form = "cond"
        self.stage_index = dyn.live_stages()
        self.stages = frozen_copy(nn.ModuleList([dyn.stages[k] for k in self.stage_index]))
        # a stage's input adapter and its network apart: larger batches resize the whole batch and
        # then gather the rows still running, since a resize of a sub-batch whose size depends on
        # the data cannot be exported
        self.adapters = [s[0] if _adapted(s) else nn.Identity() for s in self.stages]
        self.networks = [s[1] if _adapted(s) else s for s in self.stages]
        thresholds = dyn.dyn.thresholds.tolist()
        self.thresholds = [thresholds[k] for k in self.stage_index[:-1]]
        self.temperatures = [float(dyn.dyn.temperatures[k]) for k in self.stage_index]
        self.combine = bool(dyn.dyn.combine)
        self.agreement = bool(dyn.dyn.agreement)
        self.criterion = dyn.criterion
        with torch.no_grad():
            self.num_classes = int(self.stages[-1](example[:1]).shape[1])

    def _answer(self, i: int, logits: torch.Tensor, total: torch.Tensor):
        return stage_answer(logits, self.temperatures[i], total, i + 1, self.combine)

    def _keeps(self, i: int, judged: torch.Tensor, own: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Stage ``i``'s decision; ``previous`` (the stage before's predictions) counts under the agreement rule."""
        previous = previous if self.agreement and i > 0 else None
        return stage_confidence(judged, self.criterion, own, previous) >= self.thresholds[i]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cond(x.shape[0] == 1, self._one_sample, self._batched, (x,))

    def _one_sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        none = torch.zeros((1,), dtype=torch.long, device=x.device)
        return self._from_stage(0, x, x.new_zeros((1, self.num_classes)), none)

    def _from_stage(self, i: int, x: torch.Tensor, total: torch.Tensor, previous: torch.Tensor):
        own = self.stages[i](x)
        answer, judged, total = self._answer(i, own, total)
        if i == len(self.stages) - 1:
            return answer, torch.full((1,), self.stage_index[i], dtype=torch.long, device=x.device)
        keep = self._keeps(i, judged, own, previous)
        index = self.stage_index[i]
        return torch.cond(
            keep,
            lambda x, answer, total, own: (
                answer.clone(),
                torch.full((1,), index, dtype=torch.long, device=x.device),
            ),
            lambda x, answer, total, own: self._from_stage(i + 1, x, total, own.argmax(1)),
            (x, answer, total, own),
        )

    def _batched(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        rows = torch.arange(batch, device=x.device)
        out = x.new_zeros((batch, self.num_classes))
        stages = torch.full((batch,), self.stage_index[-1], dtype=torch.long, device=x.device)
        total = x.new_zeros((batch, self.num_classes))
        previous = torch.zeros((batch,), dtype=torch.long, device=x.device)
        whole = x
        for i in range(len(self.stages) - 1):
            own = self._run(i, whole, rows)
            answer, judged, total = self._answer(i, own, total)
            keep = self._keeps(i, judged, own, previous)
            gone, stay = rows_of(keep), rows_of(~keep)
            left = rows.index_select(0, gone)
            out = out.index_copy(0, left, answer.index_select(0, gone))
            stages = stages.index_fill(0, left, self.stage_index[i])
            rows, total = rows.index_select(0, stay), total.index_select(0, stay)
            previous = own.argmax(1).index_select(0, stay)
        answer, _, _ = self._answer(len(self.stages) - 1, self._run(len(self.stages) - 1, whole, rows), total)
        return out.index_copy(0, rows, answer), stages

    def _run(self, i: int, whole: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` on the ``rows`` of the whole batch still running (all of them at the first)."""
        if i == 0:
            return self.stages[0](whole)
        return self.networks[i](self.adapters[i](whole).index_select(0, rows))


def _adapted(stage: nn.Module) -> bool:
    """Whether a stage is an input adapter followed by its network."""
    return isinstance(stage, nn.Sequential) and len(stage) == 2 and isinstance(stage[0], InputAdapter)
