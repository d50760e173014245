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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynconvert.errors import DynconvertError
from dynconvert.options import check_choice, check_range, option
from dynconvert.passes import CutPoint, exit_points_of, find_cut_points, insert_exit_heads, split_at
from dynconvert.passes.analysis import is_channels_last
from dynconvert.passes.stages import feature_info_modules, stage_points
from dynconvert.runtime.early_exit import EarlyExitModel
from dynconvert.runtime.heads import ACTIVATIONS, NORMS, ExitHead
from dynconvert.runtime.stage_exits import StageExitModel
from dynconvert.strategies.base import Strategy
from dynconvert.strategies.early_exit_calibration import calibrate_exits
from dynconvert.strategies.early_exit_graph import EarlyExitGraph
from dynconvert.strategies.registry import register_strategy
from dynconvert.toolkit.calibrate import exit_confidences, simulate_exits
from dynconvert.toolkit.checkpoint import Checkpointer
from dynconvert.toolkit.costs import count_flops, node_flops
from dynconvert.toolkit.trace import trace
from dynconvert.toolkit.train import fit_on_cached_features, freeze, map_batches

log = logging.getLogger(__name__)


@dataclass
class EarlyExitConfig:
    """Where exits go and what they look like.

    ``points`` names modules (``layer2.3``) whose output gets an exit; when empty, exits go
    at the cut points nearest to each of ``fractions`` of the network's FLOPs (SDN-style).
    """

    points: list[str] = option([], "modules whose output gets an exit (e.g. layer2.3); empty: by fractions")
    fractions: list[float] = option(
        [0.15, 0.3, 0.45, 0.6, 0.75, 0.9], "exits at the cut points nearest these fractions of the FLOPs"
    )
    head_pool: int = option(4, "side of the adaptive average pooling before a head's classifier")
    head_hidden: int = option(256, "hidden width of a head's MLP (0: a linear head)")
    head_norm: str = option("layer", "normalisation in a head: layer or batch")
    head_activation: str = option("gelu", "activation in a head's MLP")
    token_pooling: str = option("mean", "how a transformer's tokens are pooled for a head: mean or cls")
    cost: str = option("flops", "what calibration weighs exits by: flops, or latency measured at batch 1")
    head_overhead_mflops: float = option(
        0.0, "with cost flops: what each head run costs above its FLOPs when choosing thresholds (MFLOPs)"
    )
    latency_runtime: str = option("pytorch", "with cost latency: time in pytorch, or in onnxruntime (CPU)")
    latency_threads: int = option(0, "threads for the latency measurement (0: the runtime's default)")

    def validate(self) -> None:
        for f in self.fractions:
            check_range("options.fractions", f, 0.0, 1.0)
        check_range("options.head_pool", self.head_pool, 1, None)
        check_range("options.head_hidden", self.head_hidden, 0, None)
        check_choice("options.head_norm", self.head_norm, NORMS)
        check_choice("options.head_activation", self.head_activation, ACTIVATIONS)
        check_choice("options.token_pooling", self.token_pooling, ("mean", "cls"))
        check_choice("options.cost", self.cost, ("flops", "latency"))
        check_choice("options.latency_runtime", self.latency_runtime, ("pytorch", "onnxruntime"))
        check_range("options.latency_threads", self.latency_threads, 0, None)
        check_range("options.head_overhead_mflops", self.head_overhead_mflops, 0.0, None)


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

    def prepare(
        self,
        models,
        recipe,
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
        (model,), config = models, self.config
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

    def fit(self, dyn: EarlyExitModel, data, prep, recipe, checkpointer=None) -> dict:
        """Train the heads on the fit split, then calibrate on the calibration split.

        ``checkpointer`` (a :class:`~dynconvert.toolkit.checkpoint.Checkpointer`) keeps the
        backbone's features and the heads' training state for a resumed run.
        """
        device, train_cfg = recipe.device, recipe.train
        checkpointer = checkpointer or Checkpointer.disabled()
        freeze(dyn.segments)
        # on disk when the run has a work folder: memory stays bounded however large the fit split
        teacher, *features = checkpointer.cached_rows(
            "backbone-features",
            lambda folder: map_batches(
                dyn.exit_features,
                data.fit,
                prep,
                recipe.data.batch_size,
                device,
                "backbone features",
                shard=True,
                to_disk=folder,
            ),
        )
        heads = dyn.dyn.exits
        heads.train()
        history = fit_on_cached_features(
            [h.classify for h in heads],
            [p for p in heads.parameters()],
            [_on(f, device) for f in features],
            data.fit.labels.to(device),
            _on(teacher, device),
            train_cfg,
            recipe.seed,
            module=dyn,
            checkpointer=checkpointer,
        )
        heads.eval()
        calibration = calibrate_exits(dyn, data.calibration, prep, recipe, self.config)
        return {"train_loss": history, **calibration}

    def sweep_on_split(self, dyn, split, prep, recipe, sweep: list[dict]) -> list[dict]:
        """Accuracy and FLOPs ratio on ``split`` of each calibration-sweep operating point.

        Only for the plot: the operating point itself was chosen on calibration data.
        """
        if not sweep:
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

    def open_all_(self, dyn: EarlyExitModel) -> EarlyExitModel:
        """No exit taken: every threshold above any confidence."""
        dyn.dyn.thresholds.fill_(2.0)
        return dyn

    def take_all_(self, dyn: EarlyExitModel) -> EarlyExitModel:
        """Every sample leaves at the first exit."""
        dyn.dyn.thresholds.fill_(0.0)
        return dyn

    def mixed_(self, dyn: EarlyExitModel) -> EarlyExitModel:
        """The first half of the exits off, the rest always taken."""
        n = dyn.num_exits
        dyn.dyn.thresholds.copy_(torch.tensor([2.0] * (n // 2) + [0.0] * (n - n // 2)))
        return dyn

    def training_loss(self, dyn: EarlyExitModel, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every exit, averaged (what ``fit`` adds distillation to)."""
        _, exits = dyn.forward_all(images)
        return sum(F.cross_entropy(e, labels) for e in exits) / len(exits)

    def export_graph(self, dyn: EarlyExitModel, example: torch.Tensor, form: str | None = None):
        """Exits as ``If`` branches (``cond``, the default measured faster in onnxruntime) or gathers."""
        if isinstance(dyn, StageExitModel):
            raise DynconvertError(
                "this early-exit model hangs its exits on forward hooks (the feature_info fallback: its "
                "graph could not be cut into segments), and hooks cannot be exported to ONNX"
            )
        return EarlyExitGraph(dyn, example, form or "cond").eval()

    def export_hint(self, recipe) -> str | None:
        """Exits priced in FLOPs alone or in PyTorch time, for a model that will run in onnxruntime:
        say how to price them there (heads weigh more against its faster backbone)."""
        config = self.config
        if config.cost == "flops" and not config.head_overhead_mflops:
            priced = "FLOPs alone"
        elif config.cost == "latency" and config.latency_runtime == "pytorch":
            priced = "PyTorch time"
        else:
            return None
        return (
            f"exits are priced in {priced}; for a model that will run in onnxruntime, --set options.cost=latency "
            "--set options.latency_runtime=onnxruntime prices them in onnxruntime's time (docs/export.md)"
        )


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


def _on(values, device: str):
    """A tensor moved to ``device``; cached rows on disk stay there (read batch by batch)."""
    return values.to(device) if isinstance(values, torch.Tensor) else values
