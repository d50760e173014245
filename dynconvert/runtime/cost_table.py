"""The cost of stopping at each of a chain of stages (segments with an optional decision head
after each): what early exit charges, and what the calibration sweep prices thresholds by."""

from __future__ import annotations

import torch


def exit_cost_table(segment_costs: torch.Tensor, head_costs: torch.Tensor, enabled: torch.Tensor) -> torch.Tensor:
    """Cost of leaving at each exit (the last entry: running to the end), when only ``enabled``
    heads are computed: a head whose threshold no sample can reach is never run.

    Args:
        segment_costs: (exits + 1,) cost of each backbone segment.
        head_costs: (exits,) cost of computing each head and its decision.
        enabled: (exits,) bool, which heads run.
    """
    segments = torch.cumsum(segment_costs.double(), 0)
    heads = torch.cumsum(head_costs.double() * enabled.double(), 0)
    return torch.cat([segments[:-1] + heads, segments[-1:] + heads[-1:]])
