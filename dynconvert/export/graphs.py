"""What the export forms of the dynamic models share: each strategy's graph (its
``export_graph`` hook) is pure tensor code that returns (logits, decisions), with per-sample
routing expressed as data-dependent gathers and, where chosen, ``torch.cond``; nothing reads a
tensor's value in Python. These helpers tell torch.export the sizes such routing produces."""

from __future__ import annotations

import torch
from torch import nn

FORMS = ("gather", "cond")


def check_sub_batch(h: torch.Tensor, rows: torch.Tensor, batch) -> None:
    """Tell torch.export what a ``torch.cond`` output of data-dependent size is: a sub-batch."""
    torch._check(h.shape[0] >= 0)
    torch._check(h.shape[0] <= batch)
    torch._check(rows.shape[0] == h.shape[0])


def rows_of(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a 1-D mask, a size torch.export can reason about."""
    rows = mask.nonzero().reshape(-1)  # not squeeze(1): the exported Squeeze fails on empty rows
    torch._check(rows.shape[0] >= 0)
    torch._check(rows.shape[0] <= mask.shape[0])
    return rows


@torch.no_grad()
def stage_shapes(stages: nn.ModuleList, example: torch.Tensor) -> tuple[list[tuple[int, ...]], int]:
    """Per-sample output shape of each stage, and the number of classes (the last stage's width)."""
    shapes, h = [], example[:1]
    for stage in stages:
        h = stage(h)
        shapes.append(tuple(h.shape[1:]))
    return shapes, shapes[-1][0]
