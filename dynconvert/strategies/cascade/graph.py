"""The cascade's export form: ``forward(x) -> (answers, stages)`` in pure tensor code. A batch
of one runs a chain of ``If`` nodes (a confident stage is all that runs); larger batches hand
the unsure samples on as a gathered sub-batch."""

from __future__ import annotations

import torch
from torch import nn

from dynconvert.export.frozen import frozen_copy
from dynconvert.export.graphs import rows_of
from dynconvert.runtime.confidence import confidence


class CascadeGraph(nn.Module):
    """Export form of a ``CascadeModel``: the live stages, their thresholds and temperatures as constants."""

    output_names = ("logits", "stages")

    def __init__(self, dyn, example: torch.Tensor):
        super().__init__()
        self.form = "cond"
        self.stage_index = dyn.live_stages()
        self.stages = frozen_copy(nn.ModuleList([dyn.stages[k] for k in self.stage_index]))
        thresholds = dyn.dyn.thresholds.tolist()
        self.thresholds = [thresholds[k] for k in self.stage_index[:-1]]
        self.temperatures = [float(dyn.dyn.temperatures[k]) for k in self.stage_index]
        self.combine = bool(dyn.dyn.combine)
        self.criterion = dyn.criterion
        with torch.no_grad():
            self.num_classes = int(self.stages[-1](example[:1]).shape[1])

    def _answer(self, i: int, logits: torch.Tensor, total: torch.Tensor):
        """(answer, what confidence is judged on, running sum of probabilities), as the model's ``answer``."""
        scaled = logits.float() / self.temperatures[i]
        if not self.combine:
            return logits, scaled, total
        total = total + torch.softmax(scaled, dim=-1)
        mean = torch.log((total / (i + 1)).clamp_min(1e-12))
        return mean, mean, total

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cond(x.shape[0] == 1, self._one_sample, self._batched, (x,))

    def _one_sample(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._from_stage(0, x, x.new_zeros((1, self.num_classes)))

    def _from_stage(self, i: int, x: torch.Tensor, total: torch.Tensor):
        answer, judged, total = self._answer(i, self.stages[i](x), total)
        if i == len(self.stages) - 1:
            return answer, torch.full((1,), self.stage_index[i], dtype=torch.long, device=x.device)
        keep = confidence(judged, self.criterion) >= self.thresholds[i]
        index = self.stage_index[i]
        return torch.cond(
            keep,
            lambda x, answer, total: (answer.clone(), torch.full((1,), index, dtype=torch.long, device=x.device)),
            lambda x, answer, total: self._from_stage(i + 1, x, total),
            (x, answer, total),
        )

    def _batched(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        rows = torch.arange(batch, device=x.device)
        out = x.new_zeros((batch, self.num_classes))
        stages = torch.full((batch,), self.stage_index[-1], dtype=torch.long, device=x.device)
        total = x.new_zeros((batch, self.num_classes))
        for i in range(len(self.stages) - 1):
            answer, judged, total = self._answer(i, self.stages[i](x), total)
            keep = confidence(judged, self.criterion) >= self.thresholds[i]
            gone, stay = rows_of(keep), rows_of(~keep)
            left = rows.index_select(0, gone)
            out = out.index_copy(0, left, answer.index_select(0, gone))
            stages = stages.index_fill(0, left, self.stage_index[i])
            x, rows, total = x.index_select(0, stay), rows.index_select(0, stay), total.index_select(0, stay)
        answer, _, _ = self._answer(len(self.stages) - 1, self.stages[-1](x), total)
        return out.index_copy(0, rows, answer), stages
