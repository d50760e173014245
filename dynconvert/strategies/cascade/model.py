"""The cascade at run time: whole models in turn, cheapest first; a sample stops at the first
stage confident enough, and only the samples that move on run the next stage."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.confidence import confidence
from dynconvert.runtime.dynamic import DynamicModel, Routed
from dynconvert.runtime.rows import rows_where

OFF = 2.0  # a threshold above any confidence: the stage never keeps a sample, so it is not run


class InputAdapter(nn.Module):
    """Bring an input prepared for the reference model (its size, mean and std) to another
    model's: undo the reference normalisation, resize, normalise for the model. Identity when
    the two preparations agree."""

    def __init__(self, source, target, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)
        self.same = tuple(source.mean) == tuple(target.mean) and tuple(source.std) == tuple(target.std)
        self.resize = tuple(source.input_size[1:]) != self.size
        self.mode = "bicubic" if target.interpolation == "bicubic" else "bilinear"
        scale = torch.tensor(source.std) / torch.tensor(target.std)
        shift = (torch.tensor(source.mean) - torch.tensor(target.mean)) / torch.tensor(target.std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    @property
    def is_identity(self) -> bool:
        return self.same and not self.resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize:
            # antialiased, as an image library shrinks an image: plain interpolation aliases when downsampling
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False, antialias=True)
        return x if self.same else x * self.scale + self.shift


def stage_answer(logits: torch.Tensor, temperature, total: torch.Tensor | None, runs: int, combine: bool):
    """What a stage answers with, what its confidence is judged on, and the running sum of
    calibrated probabilities: its own logits and their calibrated form, or, when combining, the
    log of the average calibrated probabilities of the ``runs`` stages run so far (both).

    The one rule of the model, its export form and the calibration sweep."""
    scaled = logits.float() / temperature
    if not combine:
        return logits, scaled, total
    probs = torch.softmax(scaled, dim=-1)
    total = probs if total is None else total + probs
    mean = torch.log((total / runs).clamp_min(1e-12))
    return mean, mean, total


def stage_confidence(judged: torch.Tensor, criterion: str, own: torch.Tensor, previous: torch.Tensor | None):
    """The confidence a stage keeps a sample by; with ``previous`` (the stage before's own
    predictions: the agreement rule) a sample whose prediction differs from it has none."""
    conf = confidence(judged, criterion)
    if previous is None:
        return conf
    return torch.where(own.argmax(1) == previous, conf, torch.zeros_like(conf))


class CascadeModel(DynamicModel):
    """Stages (each an input adapter and a whole model) run in turn; per sample the decision is
    the stage whose prediction it kept.

    Args:
        stages: one module per model, cheapest first, each taking the reference input.
        stage_flops: FLOPs per sample of each stage (the cost table).
        criterion: ``"max_softmax"`` or ``"entropy"``.

    Inserted state (``dyn.``): a threshold per stage but the last (starting at ``OFF``, so an
    unconverted cascade is its last model), a temperature per stage, ``combine``: 1 to judge
    and answer with the average of the calibrated probabilities of the stages run so far (the
    answer is then that average's log), 0 for each stage's own logits, and ``agreement``: 1 for
    a stage after the first to keep a sample only when its own prediction agrees with the stage
    before it (which then always runs).
    """

    def __init__(self, stages: list[nn.Module], stage_flops: list[float], criterion: str = "max_softmax"):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.stage_flops = [float(f) for f in stage_flops]
        self.criterion = criterion
        self.dyn = nn.Module()
        self.dyn.register_buffer("thresholds", torch.full((len(stages) - 1,), OFF))
        self.dyn.register_buffer("temperatures", torch.ones(len(stages)))
        self.dyn.register_buffer("combine", torch.zeros(()))
        self.dyn.register_buffer("agreement", torch.zeros(()))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def live_stages(self, thresholds: torch.Tensor | None = None) -> list[int]:
        """The stages that run for some sample: those whose threshold can be met, and the last;
        every stage when combining (an answer averages all the stages before it) or judging by
        agreement (a stage compares with the one before it)."""
        if bool(self.dyn.combine) or bool(self.dyn.agreement):
            return list(range(self.num_stages))
        thresholds = self.dyn.thresholds if thresholds is None else thresholds
        return [k for k, t in enumerate(thresholds.tolist()) if t <= 1.0] + [self.num_stages - 1]

    def stage_costs(self, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        """FLOPs per sample of stopping at each stage: the live stages up to it (float64)."""
        live = set(self.live_stages(thresholds))
        paid = [f if k in live else 0.0 for k, f in enumerate(self.stage_flops)]
        return torch.cumsum(torch.tensor(paid, dtype=torch.float64), 0)

    def flops_of(self, decisions: torch.Tensor) -> torch.Tensor:
        return self.stage_costs().to(decisions.device)[decisions]

    def static_flops(self) -> float:
        """The last (largest) model alone: the reference of every ratio."""
        return self.stage_flops[-1]

    def inserted_flops(self) -> float:
        return 0.0

    def summarize(self, decisions: torch.Tensor) -> dict:
        return {"stage_histogram": torch.bincount(decisions, minlength=self.num_stages).tolist()}

    def describe(self) -> str:
        return f"cascade of {self.num_stages} models"

    def answer(self, k: int, logits: torch.Tensor, total: torch.Tensor | None, runs: int):
        """``stage_answer`` with stage ``k``'s temperature and this model's combination."""
        return stage_answer(logits, self.dyn.temperatures[k], total, runs, bool(self.dyn.combine))

    def load_inserted_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """As the base's; a cascade saved before the agreement rule existed judges without it."""
        if "dyn.agreement" not in state:
            state = {**state, "dyn.agreement": torch.zeros(())}
        return super().load_inserted_state(state)

    def route(self, x: torch.Tensor) -> Routed:
        if x.shape[0] == 1:
            return self._route_one(x)
        live = self.live_stages()
        agreement = bool(self.dyn.agreement)
        batch = x.shape[0]
        out = None
        decisions = torch.full((batch,), live[-1], dtype=torch.long, device=x.device)
        remaining = torch.arange(batch, device=x.device)
        total = previous = None
        for runs, k in enumerate(live, start=1):
            own = self.stages[k](x)
            answer, judged, total = self.answer(k, own, total, runs)
            if out is None:
                out = answer.new_empty((batch, answer.shape[1]))
            if k == live[-1]:
                out.index_copy_(0, remaining, answer)
                break
            # softmax of log-probabilities gives the probabilities back: every criterion reads them
            keep = stage_confidence(judged, self.criterion, own, previous) >= self.dyn.thresholds[k]
            done, going = rows_where(keep), rows_where(~keep)
            if done.numel():
                leaving = remaining.index_select(0, done)
                out.index_copy_(0, leaving, answer.index_select(0, done))
                decisions.index_fill_(0, leaving, k)
            if going.numel() == 0:
                break
            remaining = remaining.index_select(0, going)
            x = x.index_select(0, going)
            total = None if total is None else total.index_select(0, going)
            previous = own.argmax(1).index_select(0, going) if agreement else None
        return Routed(out, decisions)

    def _route_one(self, x: torch.Tensor) -> Routed:
        """One sample: each decision read as one number, no rows gathered or scattered."""
        live, thresholds = self.live_stages(), self.dyn.thresholds.tolist()
        agreement = bool(self.dyn.agreement)
        total = previous = None
        for runs, k in enumerate(live, start=1):
            own = self.stages[k](x)
            answer, judged, total = self.answer(k, own, total, runs)
            if k == live[-1] or float(stage_confidence(judged, self.criterion, own, previous)) >= thresholds[k]:
                return Routed(answer, torch.full((1,), k, dtype=torch.long, device=x.device))
            previous = own.argmax(1) if agreement else None
        raise AssertionError("the last live stage keeps every sample")
