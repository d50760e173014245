"""The one operating-point chooser: which point of a calibration sweep meets the recipe's budget.

Every strategy sweeps its own knob (thresholds, an offset on keep-logits, ...) and records, per
point, ``flops_ratio``, ``accuracy_drop`` and ``accuracy_drop_bound`` (the 95% upper bound of
the drop on the calibration data); this module picks among them the same way for all.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


_REQUIRED = object()


def _get(point: Any, key: str, default: Any = _REQUIRED):
    """A field of a point that is a dict or an object; ``default`` where it may be missing."""
    if default is _REQUIRED:
        return point[key] if isinstance(point, dict) else getattr(point, key)
    return point.get(key, default) if isinstance(point, dict) else getattr(point, key, default)


def choose_point(
    points: list,
    max_accuracy_drop: float | None = None,
    flops_ratio: float | None = None,
    cheapest_by="flops_ratio",
    drop_from: str = "static",
) -> tuple[Any, bool]:
    """The operating point for the budget, and whether the budget was met.

    With ``max_accuracy_drop``: the cheapest point (in ``cheapest_by``: the FLOPs ratio, or a
    ratio the sweep was priced in) whose drop bound is within it. Drops are measured from the
    static model; with ``drop_from="best"``, also from the most accurate point of the sweep (the
    point is within the budget of both): by the points' ``accuracy_drop_from_best_bound`` where
    the sweep set it (``calibrate.bound_drops_from_best``), else by each bound less the best
    point's gain over the static model. With ``flops_ratio``: the most accurate point within
    that FLOPs ratio. When no point meets the budget the most accurate point is kept, a warning
    says so, and the second value is False. Points are objects or
    dicts with those fields.
    """
    if max_accuracy_drop is not None:
        feasible = [p for p in points if _drop_bound(p, points, drop_from) <= max_accuracy_drop]
        if feasible:
            return min(feasible, key=lambda p: _get(p, cheapest_by)), True
        wanted = f"an accuracy drop within {max_accuracy_drop:.3f} (95% upper bound)"
    else:
        feasible = [p for p in points if _get(p, "flops_ratio") <= flops_ratio]
        if feasible:
            return min(feasible, key=lambda p: (_get(p, "accuracy_drop"), _get(p, "flops_ratio"))), True
        wanted = f"a FLOPs ratio within {flops_ratio:.3f}"
    best = min(points, key=lambda p: (_get(p, "accuracy_drop_bound"), _get(p, "flops_ratio")))
    log.warning(
        "calibrate: no operating point has %s on the calibration data; kept the most accurate one "
        "(drop bound %.3f, FLOPs ratio %.3f)",
        wanted,
        _get(best, "accuracy_drop_bound"),
        _get(best, "flops_ratio"),
    )
    return best, False


def _drop_bound(point: Any, points: list, drop_from: str) -> float:
    """The upper bound of ``point``'s accuracy drop that the budget is checked against."""
    bound = _get(point, "accuracy_drop_bound")
    if drop_from != "best":
        return bound
    from_best = _get(point, "accuracy_drop_from_best_bound", None)
    if from_best is not None:
        return max(bound, from_best)
    gain = max(0.0, -min(_get(p, "accuracy_drop") for p in points))
    return bound + gain
