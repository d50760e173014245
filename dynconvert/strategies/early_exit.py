"""Early exit (BranchyNet / Shallow-Deep Networks / SCAN): classifiers part-way through the network.

prepare: trace, find cut points, pick them by module name or by fraction of the FLOPs, insert
exit heads with a graph pass, split the backbone into segments.
fit: cache what the frozen backbone computes at each exit once, train every head on it with
self-distillation from the final classifier, fit a temperature per exit and thresholds to the
budget on held-out data.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch

from dynconvert.convert.calibrate import (
    choose_operating_point,
    exit_confidences,
    fit_temperature,
    simulate_exits,
    threshold_sweep,
)
from dynconvert.convert.checkpoint import Checkpointer
from dynconvert.convert.costs import count_flops, node_flops
from dynconvert.convert.data import normalize
from dynconvert.convert.latency import early_exit_latency, early_exit_onnx_latency
from dynconvert.convert.trace import trace
from dynconvert.convert.train import fit_on_cached_features, freeze, map_batches
from dynconvert.errors import DynconvertError
from dynconvert.passes import CutPoint, exit_points_of, find_cut_points, insert_exit_heads, split_at
from dynconvert.passes.analysis import is_channels_last
from dynconvert.passes.stages import feature_info_modules, stage_points
from dynconvert.recipe import _check_choice, _check_range
from dynconvert.runtime.early_exit import EarlyExitModel
from dynconvert.runtime.heads import ACTIVATIONS, NORMS, ExitHead
from dynconvert.runtime.stage_exits import StageExitModel
from dynconvert.strategies.registry import Strategy, register_strategy

log = logging.getLogger(__name__)


@dataclass
class EarlyExitConfig:
    """Where exits go and what they look like.

    ``points`` names modules (``layer2.3``) whose output gets an exit; when empty, exits go
    at the cut points nearest to each of ``fractions`` of the network's FLOPs (SDN-style).
    """

    points: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=lambda: [0.15, 0.3, 0.45, 0.6, 0.75, 0.9])
    head_pool: int = 4
    head_hidden: int = 256
    head_norm: str = "layer"
    head_activation: str = "gelu"
    token_pooling: str = "mean"

    def validate(self) -> None:
        for f in self.fractions:
            _check_range("options.fractions", f, 0.0, 1.0)
        _check_range("options.head_pool", self.head_pool, 1, None)
        _check_range("options.head_hidden", self.head_hidden, 0, None)
        _check_choice("options.head_norm", self.head_norm, NORMS)
        _check_choice("options.head_activation", self.head_activation, ACTIVATIONS)
        _check_choice("options.token_pooling", self.token_pooling, ("mean", "cls"))


def choose_points(points: list[CutPoint], config: EarlyExitConfig) -> list[CutPoint]:
    """The cut points the recipe asks for, in graph order, without duplicates."""
    if not points:
        raise DynconvertError("found no place to insert an exit: the traced graph has no block ends")
    if config.points:
        by_name = {name: p for p in points for name in p.modules}
        missing = [n for n in config.points if n not in by_name]
        if missing:
            raise DynconvertError(
                f"options.points names {', '.join(missing)}, which are no exit candidates; "
                f"candidates: {', '.join(p.name for p in points)}"
            )
        chosen = {by_name[n].node: by_name[n] for n in config.points}
    else:
        chosen = {}
        for fraction in config.fractions:
            best = min(points, key=lambda p: abs(p.flops_fraction - fraction))
            chosen[best.node] = best
    order = {p.node: i for i, p in enumerate(points)}
    return sorted(chosen.values(), key=lambda p: order[p.node])


@register_strategy
class EarlyExit(Strategy):
    """Exit heads with confidence thresholds."""

    name = "early-exit"
    config_class = EarlyExitConfig

    @staticmethod
    def prepare(
        model,
        recipe,
        config: EarlyExitConfig,
        example: torch.Tensor,
        num_classes: int,
        exit_nodes=None,
        exit_modules=None,
    ):
        """Trace ``model``, insert exit heads and return an untrained :class:`EarlyExitModel`.

        When the traced graph offers no cut point (or the model cannot be traced) and timm lists
        the model's stages, the exits go on those stages instead (:class:`StageExitModel`).
        ``exit_nodes`` / ``exit_modules`` replay a saved plan.
        """
        if exit_modules is not None:
            return _prepare_on_stages(model, config, example, num_classes, recipe, exit_modules, "replayed")
        try:
            gm = trace(model, recipe.model.leaf_modules, example)
        except DynconvertError as exc:
            if exit_nodes is not None or not feature_info_modules(model):
                raise
            return _prepare_on_stages(model, config, example, num_classes, recipe, None, f"untraceable: {exc}")
        flops = node_flops(gm, example)
        candidates = find_cut_points(gm, flops)
        if not candidates and exit_nodes is None and feature_info_modules(model):
            reason = "the traced graph has no point where a single tensor is alive"
            return _prepare_on_stages(model, config, example, num_classes, recipe, None, reason)
        if exit_nodes is None:
            chosen = choose_points(candidates, config)
        else:
            chosen = _replayed(candidates, exit_nodes, "exit points", "the traced model")
        heads = _heads_for(chosen, num_classes, config)
        gm = insert_exit_heads(gm, [p.node for p in chosen], heads)
        segments = split_at(gm, exit_points_of(gm))
        segment_flops, h = [], example
        for segment in segments:
            segment_flops.append(count_flops(segment, h))
            with torch.no_grad():
                h = segment(h)
        head_flops = [count_flops(head, torch.zeros(2, *p.shape)) for head, p in zip(heads, chosen)]
        dyn = EarlyExitModel(segments, heads, segment_flops, head_flops, recipe.calibrate.criterion)
        dyn.plan = {
            "replay": {"exit_nodes": [p.node for p in chosen]},
            "insertion": "graph cut: the backbone is split into segments at the exits",
            "exit_modules": [p.name for p in chosen],
            "exit_flops_fractions": [p.flops_fraction for p in chosen],
            "head_flops": head_flops,
        }
        return dyn.eval()

    @staticmethod
    def fit(dyn: EarlyExitModel, data, prep, recipe, config: EarlyExitConfig, checkpointer=None) -> dict:
        """Train the heads on the fit split, then calibrate on the calibration split.

        ``checkpointer`` (a :class:`~dynconvert.convert.checkpoint.Checkpointer`) keeps the
        backbone's features and the heads' training state for a resumed run.
        """
        device, train_cfg = recipe.device, recipe.train
        if train_cfg.tune_backbone:
            raise DynconvertError(
                "train.tune_backbone is not supported by the early-exit strategy yet; "
                "leave it empty to train the exits on a frozen backbone"
            )
        checkpointer = checkpointer or Checkpointer.disabled()
        freeze(dyn.segments)
        teacher, *features = checkpointer.cached(
            "backbone-features",
            lambda: map_batches(
                dyn.exit_features,
                data.fit,
                prep,
                recipe.data.batch_size,
                device,
                "backbone features",
                shard=True,
            ),
        )
        heads = dyn.dyn.exits
        heads.train()
        history = fit_on_cached_features(
            [h.classify for h in heads],
            [p for p in heads.parameters()],
            [f.to(device) for f in features],
            data.fit.labels.to(device),
            teacher.to(device),
            train_cfg,
            recipe.seed,
            module=dyn,
            checkpointer=checkpointer,
        )
        heads.eval()
        calibration = calibrate_exits(dyn, data.calibration, prep, recipe)
        return {"train_loss": history, **calibration}

    @staticmethod
    def sweep_on_split(dyn, split, prep, recipe, sweep: list[dict]) -> list[dict]:
        """Accuracy and FLOPs ratio on ``split`` of each calibration-sweep operating point.

        Only for the plot: the operating point itself was chosen on calibration data.
        """
        if not sweep or not hasattr(dyn, "forward_all"):
            return []
        final, *exit_logits = map_batches(
            dyn.forward_all, split, prep, recipe.data.batch_size, recipe.device, "sweep on evaluation"
        )
        temperatures = dyn.dyn.temperatures.cpu().tolist()
        conf = exit_confidences(exit_logits, temperatures, recipe.calibrate.criterion)
        preds = torch.stack([lg.argmax(1) for lg in exit_logits] + [final.argmax(1)])
        columns = torch.arange(len(split))
        points = []
        for p in sweep[:: max(1, len(sweep) // 100)] + [sweep[-1]]:
            thresholds = torch.tensor(p["thresholds"])
            costs = dyn.exit_costs(thresholds)
            exits = simulate_exits(conf, thresholds)
            acc = (preds[exits, columns] == split.labels).float().mean()
            points.append({"flops_ratio": float(costs[exits].mean()) / dyn.static_flops(), "accuracy": float(acc)})
        return points


def _replayed(points: list[CutPoint], saved: list[str], what: str, where: str) -> list[CutPoint]:
    """The points a saved plan names, in its order; an error when the model no longer has them."""
    by_node = {p.node: p for p in points}
    unknown = [n for n in saved if n not in by_node]
    if unknown:
        raise DynconvertError(f"saved {what} {', '.join(unknown)} are not in {where}: it changed since saving")
    return [by_node[n] for n in saved]


def _heads_for(points: list[CutPoint], num_classes: int, config: EarlyExitConfig) -> list[ExitHead]:
    return [
        ExitHead(
            p.shape,
            num_classes,
            config.head_pool,
            config.head_hidden,
            config.token_pooling,
            is_channels_last(p.shape),
            config.head_norm,
            config.head_activation,
        )
        for p in points
    ]


def _prepare_on_stages(model, config, example, num_classes, recipe, exit_modules, reason: str) -> StageExitModel:
    """Exits on timm's feature_info stages, run from forward hooks (the fallback; says so in the log and plan)."""
    points = stage_points(model, example)
    if exit_modules is None:
        log.warning("early-exit: %s; falling back to stage ends from timm's feature_info (forward hooks)", reason)
        if not points:
            raise DynconvertError(
                "found no place to insert an exit: the traced graph has no block ends and no stage "
                "listed in the model's feature_info outputs a feature map or token sequence"
            )
        chosen = choose_points(points, config)
    else:
        chosen = _replayed(points, exit_modules, "exit stages", "the model")
    heads = _heads_for(chosen, num_classes, config)
    total = count_flops(model, example)
    ends = [p.flops_before for p in chosen]
    segment_flops = [b - a for a, b in zip([0.0, *ends], [*ends, total])]
    head_flops = [count_flops(head, torch.zeros(2, *p.shape)) for head, p in zip(heads, chosen)]
    backbone = copy.deepcopy(model).eval()
    names = [p.node for p in chosen]
    dyn = StageExitModel(backbone, names, heads, segment_flops, head_flops, recipe.calibrate.criterion)
    dyn.plan = {
        "replay": {"exit_modules": [p.node for p in chosen]},
        "insertion": f"feature_info fallback: exits on stage ends, run from forward hooks ({reason})",
        "exit_modules": [p.name for p in chosen],
        "exit_flops_fractions": [p.flops_fraction for p in chosen],
        "head_flops": head_flops,
    }
    return dyn.eval()


def calibrate_exits(dyn: EarlyExitModel, split, prep, recipe) -> dict:
    """Fit per-exit temperatures and thresholds on ``split``; set them on ``dyn``; return the sweep."""
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
    if cal.cost == "latency" and isinstance(dyn, StageExitModel):
        log.warning("calibrate.cost=latency needs graph segments; the stage-end fallback is calibrated on FLOPs")
    if cal.cost == "latency" and not isinstance(dyn, StageExitModel):
        latency = _latency_sweep(dyn, split, prep, recipe, conf, exit_correct, final_correct)
        path, cheapest_by = latency.pop("path"), "time_ratio"
    else:
        segment_flops, head_flops = dyn.flops_table()
        overhead = cal.head_overhead_mflops * 1e6 if cal.cost == "flops" else 0.0
        path = threshold_sweep(
            conf, exit_correct, final_correct, segment_flops, head_flops + overhead, dyn.static_flops()
        )
        cheapest_by = "flops_ratio"
        if overhead:
            _with_true_flops(dyn, conf, path, "priced_ratio")
            cheapest_by = "priced_ratio"
    chosen = choose_operating_point(path, cal.max_accuracy_drop, cal.flops_ratio, cheapest_by)
    dyn.dyn.temperatures.copy_(torch.tensor(temperatures))
    dyn.dyn.thresholds.copy_(torch.tensor(chosen.thresholds))
    return {
        "temperatures": temperatures,
        "sweep": [p.__dict__ for p in path],
        "chosen": chosen.__dict__,
        "calibration_static_accuracy": float((final.argmax(1) == labels).float().mean()),
        "calibration_reference": cal.reference,
        "cost": cal.cost,
        **({"latency_table": latency} if latency else {}),
    }


def _latency_sweep(dyn, split, prep, recipe, conf, exit_correct, final_correct) -> dict:
    """The sweep costed in measured batch-1 time (in PyTorch on the recipe's device, or in
    onnxruntime on the CPU); each point also carries its FLOPs ratio."""
    cal = recipe.calibrate
    images = normalize(split.images[:8].to(recipe.device), prep)
    if cal.latency_runtime == "onnxruntime":
        try:
            segment_s, head_s = early_exit_onnx_latency(dyn, images, threads=cal.latency_threads)
        except DynconvertError as exc:
            raise DynconvertError(
                f"calibrate.latency_runtime=onnxruntime times each part of the model exported to ONNX, "
                f"and a part did not export ({exc}); price the exits in PyTorch time instead: "
                "--set calibrate.latency_runtime=pytorch"
            ) from exc
    else:
        timed = dyn
        if images.dim() == 4 and recipe.device == "cpu":  # timed in the faster layout on CPU, on a copy
            images = images.contiguous(memory_format=torch.channels_last)
            timed = copy.deepcopy(dyn).to(memory_format=torch.channels_last)
        segment_s, head_s = early_exit_latency(timed, images, threads=cal.latency_threads)
    path = threshold_sweep(conf, exit_correct, final_correct, segment_s, head_s, float(segment_s.sum()))
    _with_true_flops(dyn, conf, path, "time_ratio")
    return {
        "path": path,
        "batch": 1,
        "runtime": cal.latency_runtime,
        "threads": cal.latency_threads,
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
