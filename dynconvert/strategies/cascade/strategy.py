"""Cascades of pretrained models (Big/Little networks; Wang et al., "Wisdom of Committees"):
the cheapest model first, a sample handed on only while the models so far are unsure.

prepare: each model behind an adapter from the reference input (the last model's size, mean
and std) to its own pretrained preparation; the FLOPs of each stage.
fit: nothing is trained. On held-out training images every stage's logits are computed once,
a temperature fitted per stage, and thresholds chosen by the same sweep and the same 95%
bound as early exit's, against the most accurate stage alone there (FLOPs are measured against
the last); whether a stage answers with its own probabilities or with the average of the
stages run so far is chosen there too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.options import check_choice, check_range, option
from dynconvert.strategies.base import Strategy
from dynconvert.strategies.cascade.graph import CascadeGraph
from dynconvert.strategies.cascade.model import OFF, CascadeModel, InputAdapter, stage_answer, stage_confidence
from dynconvert.strategies.registry import register_strategy
from dynconvert.toolkit.calibrate import fit_temperature, simulate_exits, threshold_sweep
from dynconvert.toolkit.choose import choose_point
from dynconvert.toolkit.costs import count_flops
from dynconvert.toolkit.data import Preprocess
from dynconvert.toolkit.train import map_batches

log = logging.getLogger(__name__)

ALWAYS = 3.0  # a confidence above every threshold, OFF included: the last stage keeps everything


@dataclass
class CascadeConfig:
    """How the stages decide."""

    combine: str = option(
        "auto", "answer with the average of the stages run so far: auto (chosen on calibration data), always, never"
    )
    agreement: str = option(
        "auto",
        "a stage after the first keeps a sample only when it agrees with the stage before it: "
        "auto (chosen on calibration data), always, never",
    )
    levels: int = option(40, "threshold candidates per stage (quantiles of its confidences on calibration data)")

    def validate(self) -> None:
        check_choice("options.combine", self.combine, ("auto", "always", "never"))
        check_choice("options.agreement", self.agreement, ("auto", "always", "never"))
        check_range("options.levels", self.levels, 2, None)


@register_strategy
class Cascade(Strategy):
    """Whole pretrained models in turn, cheapest first."""

    name = "cascade"
    config_class = CascadeConfig
    min_models = 2
    max_models = 8

    def prepare(self, models, recipe, example, num_classes, **replay) -> CascadeModel:
        """Each model behind an adapter from the reference input; FLOPs per stage counted on ``example``."""
        reference = Preprocess.from_model(models[-1])
        reference.input_size = tuple(example.shape[1:])
        stages, flops, sizes = [], [], []
        for model in models:
            # the last model takes the reference input as it is; a model without a pretrained
            # configuration is taken to expect it too
            has_config = bool(getattr(model, "pretrained_cfg", None))
            own = Preprocess.from_model(model) if has_config and model is not models[-1] else reference
            if _num_classes(model) not in (None, _num_classes(models[-1])):
                raise DynconvertError(
                    f"the cascade's models predict different classes ({_num_classes(model)} and "
                    f"{_num_classes(models[-1])}); give models trained on the same label set"
                )
            stage, size, cost = build_stage(model, reference, own, own.input_size[1:], example)
            stages.append(stage)
            sizes.append(size)
            flops.append(cost)
        names = [c.name for c in recipe.model_configs()]
        for k in range(1, len(flops)):
            if flops[k] < flops[k - 1]:
                log.warning(
                    "cascade: %s (%.3g FLOPs) is cheaper than %s before it (%.3g); a cascade saves most "
                    "with the cheapest model first",
                    names[k] if k < len(names) else f"model {k}",
                    flops[k],
                    names[k - 1] if k - 1 < len(names) else f"model {k - 1}",
                    flops[k - 1],
                )
        dyn = CascadeModel(stages, flops, recipe.calibrate.criterion)
        dyn.plan = {
            "replay": {},
            "insertion": "none: whole models, each behind an input adapter",
            "models": names,
            "stage_flops": flops,
            "stage_input_sizes": sizes,
        }
        return dyn.eval()

    def fit(self, dyn: CascadeModel, data, prep, recipe, checkpointer=None) -> dict:
        """Temperatures, the combination and thresholds on the calibration split; nothing is trained."""
        cal = recipe.calibrate
        logits = map_batches(
            lambda x: [stage(x) for stage in dyn.stages],
            data.calibration,
            prep,
            recipe.data.batch_size,
            recipe.device,
            "calibration",
        )
        labels = data.calibration.labels
        reference = logits[-1].argmax(1) if cal.reference == "agreement" else labels
        temperatures = [fit_temperature(lg, reference) for lg in logits]
        # the budget is held against the most accurate stage alone on these images (usually the
        # last model; for one model at several sizes a smaller input can be the better one), so
        # a cascade is never judged against a weaker single stage than it could have used
        stage_hits = [(lg.argmax(1) == reference).float().mean() for lg in logits]
        strongest = max(range(len(logits)), key=lambda k: (float(stage_hits[k]), k))
        final_correct = logits[strongest].argmax(1) == reference
        choices = {"auto": (False, True), "always": (True,), "never": (False,)}
        # with two stages the rule has nothing to judge: the last stage keeps every sample anyway
        agreements = choices[self.config.agreement] if dyn.num_stages > 2 else (False,)
        options = {}
        for rule in [(c, a) for c in choices[self.config.combine] for a in agreements]:
            # which stages run, and so what they cost, depends on the rule
            dyn.dyn.combine.fill_(float(rule[0]))
            dyn.dyn.agreement.fill_(float(rule[1]))
            answers, conf = _answers(logits, temperatures, *rule, cal.criterion)
            conf = torch.cat([conf, torch.full_like(labels, ALWAYS, dtype=torch.float)[None]])
            correct = torch.stack([a.argmax(1) == reference for a in answers])
            segments = torch.tensor([*dyn.stage_flops, 0.0], dtype=torch.float64)
            path = threshold_sweep(
                conf,
                correct,
                final_correct,
                segments,
                torch.zeros(dyn.num_stages),
                dyn.static_flops(),
                self.config.levels,
            )
            for point in path:  # a stage that keeps no sample is not run: charge only the live ones
                thresholds = torch.tensor(point.thresholds[:-1])
                stopped = simulate_exits(conf[:-1], thresholds)
                point.flops_ratio = float(dyn.stage_costs(thresholds)[stopped].mean()) / dyn.static_flops()
            options[rule] = (path, *choose_point(path, cal.max_accuracy_drop, cal.flops_ratio, drop_from=cal.drop_from))
        # the same chooser picks between the rules' chosen points
        best, _ = choose_point([p for _, p, _ in options.values()], cal.max_accuracy_drop, cal.flops_ratio)
        rule = next(r for r, (_, p, _) in options.items() if p is best)
        path, chosen, budget_met = options[rule]
        dyn.dyn.temperatures.copy_(torch.tensor(temperatures))
        dyn.dyn.thresholds.copy_(torch.tensor(chosen.thresholds[:-1]))
        dyn.dyn.combine.fill_(float(rule[0]))
        dyn.dyn.agreement.fill_(float(rule[1]))
        return {
            "temperatures": temperatures,
            "combine": rule[0],
            "agreement": rule[1],
            "rules_tried": {f"combine={c}, agreement={a}": _summary(p) for (c, a), (_, p, _) in options.items()},
            "sweep": [p.__dict__ for p in path],
            "chosen": chosen.__dict__,
            "budget_met": budget_met,
            "calibration_static_accuracy": float((logits[-1].argmax(1) == labels).float().mean()),
            "calibration_stage_accuracy": [float((lg.argmax(1) == labels).float().mean()) for lg in logits],
            "budget_reference_stage": strongest,
            "calibration_reference": cal.reference,
        }

    def sweep_on_split(self, dyn: CascadeModel, split, prep, recipe, sweep: list[dict]) -> list[dict]:
        """The sweep's points on ``split``, and each model alone (labelled: the curve must beat them)."""
        logits = map_batches(
            lambda x: [stage(x) for stage in dyn.stages], split, prep, recipe.data.batch_size, recipe.device, "sweep"
        )
        names = dyn.plan.get("models") or [f"model {k}" for k in range(dyn.num_stages)]
        static = dyn.static_flops()
        points = [
            {
                "label": f"{name} alone",
                "flops_ratio": flops / static,
                "accuracy": float((lg.argmax(1) == split.labels).float().mean()),
            }
            for name, flops, lg in zip(names, dyn.stage_flops, logits)
        ]
        if not sweep:
            return points
        rule = bool(dyn.dyn.combine), bool(dyn.dyn.agreement)
        answers, conf = _answers(logits, dyn.dyn.temperatures.tolist(), *rule, recipe.calibrate.criterion)
        predictions = torch.stack([a.argmax(1) for a in answers])
        columns = torch.arange(len(split))
        for p in sweep[:: max(1, len(sweep) // 100)] + [sweep[-1]]:
            thresholds = torch.tensor(p["thresholds"][:-1])
            stopped = simulate_exits(conf, thresholds)
            accuracy = (predictions[stopped, columns] == split.labels).float().mean()
            flops = dyn.stage_costs(thresholds)[stopped].mean()
            points.append({"flops_ratio": float(flops) / static, "accuracy": float(accuracy)})
        return points

    def open_all_(self, dyn: CascadeModel) -> CascadeModel:
        """Every sample to the last model, answered by it alone."""
        dyn.dyn.thresholds.fill_(OFF)
        dyn.dyn.combine.fill_(0.0)
        dyn.dyn.agreement.fill_(0.0)
        return dyn

    def take_all_(self, dyn: CascadeModel) -> CascadeModel:
        """Every sample kept by the first model."""
        dyn.dyn.thresholds.fill_(0.0)
        return dyn

    def mixed_(self, dyn: CascadeModel) -> CascadeModel:
        """About half the samples kept by each stage, with the stages' probabilities averaged and
        later stages judged by agreement too."""
        dyn.dyn.thresholds.fill_(0.5)
        dyn.dyn.combine.fill_(1.0)
        dyn.dyn.agreement.fill_(1.0)
        return dyn

    def export_graph(self, dyn: CascadeModel, example: torch.Tensor, form: str | None = None) -> nn.Module:
        """Deferral as ``If`` branches at batch 1 and sub-batch gathers in larger batches."""
        return CascadeGraph(dyn, example).eval()


def build_stage(model: nn.Module, reference, own, size, example: torch.Tensor) -> tuple[nn.Module, list[int], float]:
    """One stage: ``model`` behind an adapter from the ``reference`` preparation to its ``own``
    at ``size``; with the input size it runs at and its FLOPs per sample on ``example``."""
    adapter = InputAdapter(reference, own, size)
    # an adapter with nothing to do is left out: at batch 1 every call costs time
    stage = model.eval() if adapter.is_identity else nn.Sequential(adapter, model.eval())
    return stage, list(adapter.size), count_flops(stage, example[:1])


def _answers(logits: list[torch.Tensor], temperatures: list[float], combine: bool, agreement: bool, criterion: str):
    """Each stage's answer, and the confidence of every stage but the last (a stack), as the
    model computes them for a sample that reaches the stage."""
    answers, confs, total = [], [], None
    for k, (lg, t) in enumerate(zip(logits, temperatures)):
        answer, judged, total = stage_answer(lg, t, total, k + 1, combine)
        answers.append(answer)
        if k < len(logits) - 1:
            previous = logits[k - 1].argmax(1) if agreement and k > 0 else None
            confs.append(stage_confidence(judged, criterion, lg, previous))
    return answers, torch.stack(confs)


def _summary(point) -> dict:
    return {"flops_ratio": point.flops_ratio, "accuracy_drop_bound": point.accuracy_drop_bound}


def _num_classes(model: nn.Module) -> int | None:
    value = getattr(model, "num_classes", None)
    return int(value) if isinstance(value, int) else None
