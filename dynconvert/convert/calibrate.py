"""Calibration: temperatures per exit and decision thresholds fitted to a budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynconvert.errors import DynconvertError
from dynconvert.runtime.confidence import confidence


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 50) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` on ``targets``."""
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


@dataclass
class SweepPoint:
    """One operating point: thresholds and what they give on the calibration data."""

    thresholds: list[float]
    flops_ratio: float
    accuracy_drop: float
    exit_fractions: list[float] = field(default_factory=list)


def simulate_exits(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit index per sample for confidences ``conf`` (exits x samples); len(thresholds) = no exit."""
    passes = conf >= thresholds[:, None]
    first = torch.where(
        passes.any(0), passes.float().argmax(0), torch.full_like(passes[0], len(thresholds), dtype=torch.long)
    )
    return first.long()


def greedy_threshold_sweep(
    conf: torch.Tensor,
    exit_correct: torch.Tensor,
    final_correct: torch.Tensor,
    exit_costs: torch.Tensor,
    static_cost: float,
    levels: int = 60,
) -> list[SweepPoint]:
    """Lower per-exit thresholds one step at a time, best FLOPs saved per accuracy lost first.

    Args:
        conf: (exits, samples) calibrated confidences.
        exit_correct: (exits, samples) whether each exit's prediction matches the reference.
        final_correct: (samples,) whether the full network's prediction matches it.
        exit_costs: (exits + 1,) FLOPs of leaving at each exit; the last is the full network.
        static_cost: FLOPs of the original network, the denominator of every ratio.

    Returns the path from "never exit" to "always exit at the first head".
    """
    n_exits, n = conf.shape
    grids = [
        torch.quantile(conf[k].double(), torch.linspace(1.0, 0.0, levels + 1, dtype=torch.float64)).float()
        for k in range(n_exits)
    ]
    grids = [torch.cat([torch.tensor([2.0]), g]) for g in grids]
    step = [0] * n_exits
    correct = torch.cat([exit_correct, final_correct[None]]).float()
    columns = torch.arange(n)

    def evaluate(thr_steps):
        thresholds = torch.stack([grids[k][s] for k, s in enumerate(thr_steps)])
        exits = simulate_exits(conf, thresholds)
        cost = exit_costs[exits].mean() / static_cost
        drop = (final_correct.float().mean() - correct[exits, columns].mean()).item()
        return thresholds, exits, float(cost), drop

    thresholds, exits, cost, drop = evaluate(step)
    path = [_point(thresholds, exits, cost, drop, n_exits)]
    while True:
        best = None
        for k in range(n_exits):
            if step[k] + 1 >= len(grids[k]):
                continue
            trial = list(step)
            trial[k] += 1
            t, e, c, d = evaluate(trial)
            saved, lost = cost - c, d - drop
            score = saved / max(lost, 1e-4) if saved > 0 else -1.0 / max(lost + 1e-3, 1e-6)
            if best is None or score > best[0]:
                best = (score, trial, t, e, c, d)
        if best is None:
            break
        _, step, thresholds, exits, cost, drop = best
        path.append(_point(thresholds, exits, cost, drop, n_exits))
    return path


def _point(thresholds, exits, cost, drop, n_exits) -> SweepPoint:
    hist = torch.bincount(exits, minlength=n_exits + 1).float() / len(exits)
    return SweepPoint([float(t) for t in thresholds], cost, drop, hist.tolist())


def choose_operating_point(path: list[SweepPoint], max_accuracy_drop=None, flops_ratio=None) -> SweepPoint:
    """The cheapest point within the accuracy budget, or the most accurate within the FLOPs budget."""
    if max_accuracy_drop is not None:
        feasible = [p for p in path if p.accuracy_drop <= max_accuracy_drop]
        return min(feasible, key=lambda p: p.flops_ratio)
    feasible = [p for p in path if p.flops_ratio <= flops_ratio]
    if not feasible:
        cheapest = min(p.flops_ratio for p in path)
        raise DynconvertError(
            f"calibrate.flops_ratio={flops_ratio} is out of reach: the cheapest operating point costs "
            f"{cheapest:.3f} of the static FLOPs; ask for at least that"
        )
    return min(feasible, key=lambda p: (p.accuracy_drop, p.flops_ratio))


def exit_confidences(exit_logits: list[torch.Tensor], temperatures: list[float], criterion: str) -> torch.Tensor:
    """(exits, samples) confidences after temperature scaling."""
    return torch.stack([confidence(lg / t, criterion) for lg, t in zip(exit_logits, temperatures)])
