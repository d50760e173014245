"""Confidence scores for exit decisions: higher means surer, in [0, 1]."""

from __future__ import annotations

import math

import torch


def confidence(logits: torch.Tensor, criterion: str = "max_softmax") -> torch.Tensor:
    """Max softmax probability, or one minus the normalised entropy, per row of ``logits``."""
    probs = torch.softmax(logits.float(), dim=-1)
    if criterion == "max_softmax":
        return probs.max(dim=-1).values
    if criterion == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return 1.0 - entropy / math.log(logits.shape[-1])
    raise ValueError(f"unknown confidence criterion '{criterion}'")
