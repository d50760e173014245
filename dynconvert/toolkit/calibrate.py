"""Calibration: temperatures per exit and decision thresholds fitted to a budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dynconvert.runtime.confidence import confidence
from dynconvert.runtime.cost_table import exit_cost_table

# the accuracy drop must stay within budget with 95% confidence (one-sided) on the calibration data
CONFIDENCE_Z = 1.645
OFF = 2.0  # a threshold above any confidence: the exit is never taken and its head never runs


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
    accuracy_drop_bound: float = 0.0
    exit_fractions: list[float] = field(default_factory=list)
    time_ratio: float | None = None  # set when the sweep was costed in measured time
    # set when each head run was priced above its FLOPs (calibrate.head_overhead_mflops)
    priced_ratio: float | None = None
    # set by bound_drops_from_best: the drop from the sweep's most accurate point
    accuracy_drop_from_best: float | None = None
    accuracy_drop_from_best_bound: float | None = None


def bound_drops_from_best(points: list, correct: list[torch.Tensor]) -> None:
    """Set each point's accuracy drop from the most accurate point of the sweep and its 95%
    upper bound, from per-sample changes (``correct[k]``: which samples point k gets right).

    The bound's standard error is that of the difference between the two points, which share
    most of their answers; shifting the bound measured against the static model instead would
    carry the spread of every answer the fitted parts change, and refuse points that are not
    worse. Points are objects or dicts.
    """
    best = max(range(len(points)), key=lambda k: float(correct[k].float().mean()))
    for point, hits in zip(points, correct):
        drop, bound = drop_upper_bound(correct[best].float() - hits.float())
        if isinstance(point, dict):
            point.update(accuracy_drop_from_best=drop, accuracy_drop_from_best_bound=bound)
        else:
            point.accuracy_drop_from_best, point.accuracy_drop_from_best_bound = drop, bound


def simulate_exits(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit index per sample for confidences ``conf`` (exits x samples); len(thresholds) = no exit."""
    if conf.shape[0] == 0:
        return torch.zeros(conf.shape[1], dtype=torch.long)
    passes = conf >= thresholds[:, None]
    never = torch.full((conf.shape[1],), len(thresholds), dtype=torch.long)
    return torch.where(passes.any(0), passes.float().argmax(0).long(), never)


def threshold_sweep(
    conf: torch.Tensor,
    exit_correct: torch.Tensor,
    final_correct: torch.Tensor,
    segment_costs: torch.Tensor,
    head_costs: torch.Tensor,
    static_cost: float,
    levels: int = 40,
    tradeoffs: int = 40,
    rounds: int = 3,
) -> list[SweepPoint]:
    """Per-exit thresholds that minimise ``cost ratio + lambda * accuracy drop``, for a range of lambda.

    For each lambda (cheap-first to accurate-first), coordinate descent over the exits: each
    exit's threshold is set to the best of ``levels`` quantiles of its confidences, or to "off"
    (its head is not computed, so it costs nothing), with the others held, ``rounds`` times.
    Each lambda starts from the previous solution.

    Args:
        conf: (exits, samples) calibrated confidences.
        exit_correct: (exits, samples) whether each exit's prediction matches the reference.
        final_correct: (samples,) whether the full network's prediction matches it.
        segment_costs: (exits + 1,) cost of each backbone segment (FLOPs, or measured time).
        head_costs: (exits,) cost of each head and its decision, paid only by enabled heads.
        static_cost: cost of the original network, the denominator of every ratio.

    Returns the operating points found, one per lambda, plus "never exit".
    """
    n_exits, n = conf.shape
    quantiles = torch.linspace(1.0, 0.0, levels + 1, dtype=torch.float64)
    grids = [
        torch.cat([torch.tensor([OFF]), torch.quantile(conf[k].double(), quantiles).float()]) for k in range(n_exits)
    ]
    correct = torch.cat([exit_correct, final_correct[None]]).float()
    columns = torch.arange(n)
    thresholds = torch.full((n_exits,), OFF)

    def ratio_for(th):
        return exit_cost_table(segment_costs, head_costs, th <= 1.0) / static_cost

    def measure(th):
        exits = simulate_exits(conf, th)
        return exits, float(ratio_for(th)[exits].mean()), final_correct.float() - correct[exits, columns]

    exits, cost, drop = measure(thresholds)
    path = [_point(thresholds, exits, cost, drop, n_exits)]
    for lam in torch.logspace(2.5, -0.5, tradeoffs).tolist():
        for _ in range(rounds):
            for k in range(n_exits):
                thresholds[k] = _best_threshold(conf, thresholds, k, grids[k], ratio_for, correct, lam)
        exits, cost, drop = measure(thresholds)
        path.append(_point(thresholds, exits, cost, drop, n_exits))
    return path


def _best_threshold(conf, thresholds, k, grid, ratio_for, correct, lam) -> float:
    """The value of exit k's threshold in ``grid`` minimising cost + lam * drop, others fixed."""
    n_exits, n = conf.shape
    passes = conf >= thresholds[:, None]
    before = passes[:k].any(0)
    alternative = simulate_exits(conf[k + 1 :], thresholds[k + 1 :]) + k + 1
    alternative = torch.where(before, simulate_exits(conf[:k], thresholds[:k]), alternative)
    leave = (~before)[None] & (conf[k][None] >= grid[:, None])  # (grid, samples)
    exits = torch.where(leave, torch.full_like(alternative, k)[None], alternative[None])
    on, off = thresholds.clone(), thresholds.clone()
    on[k], off[k] = 0.0, OFF
    ratio_on, ratio_off = ratio_for(on), ratio_for(off)
    cost = torch.where(grid[:, None] <= 1.0, ratio_on[exits], ratio_off[exits]).mean(1)
    accuracy = correct.gather(0, exits.clamp(max=n_exits)).mean(1)
    best = torch.argmin(cost - lam * accuracy.double())
    return float(grid[best])


def drop_upper_bound(change: torch.Tensor, z: float = CONFIDENCE_Z) -> tuple[float, float]:
    """Mean accuracy drop from per-sample changes (final correct - dynamic correct, in {-1, 0, 1})
    and its one-sided upper confidence bound, ``mean + z * standard error``."""
    mean = float(change.mean())
    if len(change) < 2:
        return mean, mean
    return mean, mean + z * float(change.std()) / len(change) ** 0.5


def _point(thresholds, exits, cost, change, n_exits) -> SweepPoint:
    hist = torch.bincount(exits, minlength=n_exits + 1).float() / len(exits)
    drop, bound = drop_upper_bound(change)
    return SweepPoint([float(t) for t in thresholds], cost, drop, bound, hist.tolist())


def exit_confidences(exit_logits: list[torch.Tensor], temperatures: list[float], criterion: str) -> torch.Tensor:
    """(exits, samples) confidences after temperature scaling."""
    return torch.stack([confidence(lg / t, criterion) for lg, t in zip(exit_logits, temperatures)])
