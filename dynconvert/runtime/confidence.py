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


def row_confidence(logits: list[float], temperature: float = 1.0, criterion: str = "max_softmax") -> float:
    """:func:`confidence` of one sample's logits given as Python floats, divided by ``temperature``.

    At batch 1 the decision needs one number; computing it in Python from the logits spares
    the handful of tensor operations (and their dispatch) that :func:`confidence` costs.
    """
    scaled = [v / temperature for v in logits]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    total = sum(weights)
    if criterion == "max_softmax":
        return 1.0 / total
    if criterion == "entropy":
        entropy = -sum(w / total * math.log(max(w / total, 1e-12)) for w in weights)
        return 1.0 - entropy / math.log(len(logits))
    raise ValueError(f"unknown confidence criterion '{criterion}'")
