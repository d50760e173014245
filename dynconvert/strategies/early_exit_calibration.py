"""Early exit's calibration: a temperature per exit, then thresholds to the recipe's budget,
the exits priced in FLOPs (optionally with a per-head overhead) or in measured batch-1 time."""

from __future__ import annotations

import copy
import logging

import torch

from dynconvert.errors import DynconvertError
from dynconvert.runtime.early_exit import EarlyExitModel
from dynconvert.runtime.stage_exits import StageExitModel
from dynconvert.strategies.early_exit_latency import early_exit_latency, early_exit_onnx_latency
from dynconvert.toolkit.calibrate import (
    bound_drops_from_best,
    exit_confidences,
    fit_temperature,
    simulate_exits,
    threshold_sweep,
)
from dynconvert.toolkit.choose import choose_point
from dynconvert.toolkit.data import normalize
from dynconvert.toolkit.train import map_batches

log = logging.getLogger(__name__)


def calibrate_exits(dyn: EarlyExitModel, split, prep, recipe, options) -> dict:
    """Fit per-exit temperatures and thresholds on ``split``; set them on ``dyn``; return the sweep.

    ``options``: the early-exit options (how exits are priced).
    """
    cal = recipe.calibrate
    final, *exit_logits = map_batches(
        dyn.forward_all, split, prep, recipe.data.batch_size, recipe.device, "calibration"
    )
    labels = split.labels
    reference = final.argmax(1) if cal.reference == "agreement" else labels
    temperatures = [fit_temperature(lg, reference) for lg in exit_logits]
    conf = exit_confidences(exit_logits, temperatures, cal.criterion)
    exit_correct = torch.stack([lg.argmax(1) == reference for lg in exit_logits])
    final_correct = final.argmax(1) == reference
    latency = None
    if options.cost == "latency" and isinstance(dyn, StageExitModel):
        log.warning("options.cost=latency needs graph segments; the stage-end fallback is calibrated on FLOPs")
    if options.cost == "latency" and not isinstance(dyn, StageExitModel):
        latency = _latency_sweep(dyn, split, prep, recipe, options, conf, exit_correct, final_correct)
        path, cheapest_by = latency.pop("path"), "time_ratio"
    else:
        segment_flops, head_flops = dyn.flops_table()
        overhead = options.head_overhead_mflops * 1e6 if options.cost == "flops" else 0.0
        path = threshold_sweep(
            conf, exit_correct, final_correct, segment_flops, head_flops + overhead, dyn.static_flops()
        )
        cheapest_by = "flops_ratio"
        if overhead:
            _with_true_flops(dyn, conf, path, "priced_ratio")
            cheapest_by = "priced_ratio"
    if cal.drop_from == "best":
        correct = torch.cat([exit_correct, final_correct[None]])
        columns = torch.arange(correct.shape[1])
        hits = [correct[simulate_exits(conf, torch.tensor(p.thresholds)), columns] for p in path]
        bound_drops_from_best(path, hits)
    chosen, budget_met = choose_point(path, cal.max_accuracy_drop, cal.flops_ratio, cheapest_by, cal.drop_from)
    dyn.dyn.temperatures.copy_(torch.tensor(temperatures))
    dyn.dyn.thresholds.copy_(torch.tensor(chosen.thresholds))
    return {
        "temperatures": temperatures,
        "sweep": [p.__dict__ for p in path],
        "chosen": chosen.__dict__,
        "budget_met": budget_met,
        "calibration_static_accuracy": float((final.argmax(1) == labels).float().mean()),
        "calibration_reference": cal.reference,
        "cost": options.cost,
        **({"latency_table": latency} if latency else {}),
    }


def _latency_sweep(dyn, split, prep, recipe, options, conf, exit_correct, final_correct) -> dict:
    """The sweep costed in measured batch-1 time (in PyTorch on the recipe's device, or in
    onnxruntime on the CPU); each point also carries its FLOPs ratio."""
    images = normalize(split.images[:8].to(recipe.device), prep)
    if options.latency_runtime == "onnxruntime":
        try:
            segment_s, head_s = early_exit_onnx_latency(dyn, images, threads=options.latency_threads)
        except DynconvertError as exc:
            raise DynconvertError(
                f"options.latency_runtime=onnxruntime times each part of the model exported to ONNX, "
                f"and a part did not export ({exc}); price the exits in PyTorch time instead: "
                "--set options.latency_runtime=pytorch"
            ) from exc
    else:
        timed = dyn
        if images.dim() == 4 and recipe.device == "cpu":  # timed in the faster layout on CPU, on a copy
            images = images.contiguous(memory_format=torch.channels_last)
            timed = copy.deepcopy(dyn).to(memory_format=torch.channels_last)
        segment_s, head_s = early_exit_latency(timed, images, threads=options.latency_threads)
    path = threshold_sweep(conf, exit_correct, final_correct, segment_s, head_s, float(segment_s.sum()))
    _with_true_flops(dyn, conf, path, "time_ratio")
    return {
        "path": path,
        "batch": 1,
        "runtime": options.latency_runtime,
        "threads": options.latency_threads,
        "segment_ms": (segment_s * 1e3).tolist(),
        "head_ms": (head_s * 1e3).tolist(),
    }


def _with_true_flops(dyn, conf, path, priced_as: str) -> None:
    """For a sweep costed otherwise than in FLOPs: move each point's cost ratio to ``priced_as``
    and put its FLOPs ratio (heads at their FLOPs) in ``flops_ratio``, in place."""
    for p in path:
        thresholds = torch.tensor(p.thresholds)
        exits = simulate_exits(conf, thresholds)
        flops = dyn.exit_costs(thresholds)
        setattr(p, priced_as, p.flops_ratio)
        p.flops_ratio = float(flops[exits].mean()) / dyn.static_flops()
