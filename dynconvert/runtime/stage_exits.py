"""Early exits for networks whose traced graph cannot be cut: heads on stage ends, run by hooks.

Used when the graph has no point where a single tensor is alive (a batch size or a grid size
computed from the input stays alive through the whole network, as in CoaT) or when the network
cannot be traced at all. The exit points are then the stage ends timm lists in the model's
``feature_info`` (and the blocks inside those stages), and the heads run from forward hooks on
those modules. A hook that finds every sample of the batch has exited stops the backbone by
raising, so at batch 1 nothing after the exit runs, as with graph segments.

What this form cannot do: samples do not leave a batch one by one. A batch runs on until all
of its samples have exited; per sample, the logits and exits are those of the graph form.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from dynconvert.runtime.confidence import confidence
from dynconvert.runtime.early_exit import EarlyExitModel, Routed


class _AllExited(Exception):
    """Raised from a hook to stop the backbone once no sample of the batch is left."""


class StageExitModel(EarlyExitModel):
    """An :class:`EarlyExitModel` whose exits hang on named modules of an untouched backbone.

    Args:
        backbone: the static network (the whole of it; it computes the final logits).
        points: module names, in the order the forward pass reaches them; head ``k`` reads the
            output of ``points[k]``.
        heads, segment_flops, head_flops, criterion: as for :class:`EarlyExitModel`;
            ``segment_flops[k]`` is the backbone's work between point ``k - 1`` and point ``k``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        points: list[str],
        heads: list[nn.Module],
        segment_flops: list[float],
        head_flops: list[float],
        criterion: str = "max_softmax",
    ):
        if len(points) != len(heads):
            raise ValueError("need one exit head per point")
        super().__init__([backbone], heads, [], [], criterion, check_segments=False)
        self.segment_flops = list(segment_flops)
        self.head_flops = list(head_flops)
        self.points = list(points)
        self._visit = None
        for k, name in enumerate(self.points):
            backbone.get_submodule(name).register_forward_hook(partial(self._at_point, k))

    @property
    def backbone(self) -> nn.Module:
        return self.segments[0]

    def _at_point(self, k: int, module, inputs, output):
        if self._visit is not None:
            self._visit(k, output)

    def _run(self, x: torch.Tensor, visit) -> torch.Tensor | None:
        """The backbone on ``x`` with ``visit(k, feature)`` called at each point; None if stopped."""
        self._visit = visit
        try:
            return self.backbone(x)
        except _AllExited:
            return None
        finally:
            self._visit = None

    def route(self, x: torch.Tensor) -> Routed:
        """Run with early exits; stop the backbone as soon as every sample has exited."""
        thresholds = self.dyn.thresholds.tolist()
        temperatures = self.dyn.temperatures.tolist()
        batch = x.shape[0]
        exits = torch.full((batch,), self.num_exits, dtype=torch.long, device=x.device)
        active = torch.ones(batch, dtype=torch.bool, device=x.device)
        taken: dict[str, torch.Tensor] = {}

        def visit(k: int, feature: torch.Tensor) -> None:
            if thresholds[k] > 1.0:
                return
            index = active.nonzero().squeeze(1)
            logits = self.dyn.exits[k](feature[index])
            if "logits" not in taken:
                taken["logits"] = logits.new_empty((batch, logits.shape[1]))
            leave = confidence(logits / temperatures[k], self.criterion) >= thresholds[k]
            leaving = index[leave]
            taken["logits"][leaving] = logits[leave]
            exits[leaving] = k
            active[leaving] = False
            if not bool(active.any()):
                raise _AllExited

        final = self._run(x, visit)
        if final is None:
            return Routed(taken["logits"], exits)
        if "logits" not in taken:
            return Routed(final, exits)
        taken["logits"][active] = final[active]
        return Routed(taken["logits"], exits)

    def _collect(self, x: torch.Tensor, per_point) -> tuple[torch.Tensor, list[torch.Tensor]]:
        found: dict[int, torch.Tensor] = {}
        final = self._run(x, lambda k, feature: found.setdefault(k, per_point(k, feature)))
        return final, [found[k] for k in range(self.num_exits)]

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every head and the final classifier, no exits taken."""
        return self._collect(x, lambda k, feature: self.dyn.exits[k](feature))

    def exit_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final logits, each head's parameter-free features)."""
        return self._collect(x, lambda k, feature: self.dyn.exits[k].features(feature))
