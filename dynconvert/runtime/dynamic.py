"""What every converted model offers, whatever its strategy: the ``DynamicModel`` base and the
one record of what it decided, ``Routed``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynconvert.errors import DynconvertError
from dynconvert.runtime.modules import route_for_forward

INSERTED_PREFIX = "dyn."


@dataclass
class Routed:
    """The logits of a routed batch and, per sample, what was decided.

    ``decisions`` has one row per sample; what a row holds is the model's own: the exit taken
    (early exit, cascade stage), or which blocks ran (block skipping). ``flops_of`` reads it.
    """

    logits: torch.Tensor
    decisions: torch.Tensor


class DynamicModel(nn.Module, ABC):
    """Base of every converted model.

    A subclass implements :meth:`route` (run with the decisions really taken: skipped work is
    not computed), :meth:`flops_of` (FLOPs per sample for the decisions in a ``Routed``),
    :meth:`static_flops` and :meth:`inserted_flops`; it may add figures for the report in
    :meth:`summarize`. Everything it inserted lives under the ``dyn`` submodule, so the
    inserted state (what is saved next to the recipe) is a prefix filter. ``plan`` records
    what ``Strategy.prepare`` needs to rebuild the model (its ``"replay"`` entry is passed
    back as keyword arguments); the pipeline sets ``recipe``, ``base_info`` and ``preprocess``.
    """

    def __init__(self):
        super().__init__()
        self.plan: dict[str, Any] = {}
        self.last_decisions: torch.Tensor | None = None

    @abstractmethod
    def route(self, x: torch.Tensor) -> Routed:
        """Logits and per-sample decisions, computing only what the decisions select."""

    @abstractmethod
    def flops_of(self, decisions: torch.Tensor) -> torch.Tensor:
        """FLOPs per sample (float64) for the ``decisions`` of a :class:`Routed`."""

    @abstractmethod
    def static_flops(self) -> float:
        """FLOPs per sample of the static network the model was converted from (the reference)."""

    @abstractmethod
    def inserted_flops(self) -> float:
        """FLOPs per sample of every inserted part, were all of it to run."""

    def summarize(self, decisions: torch.Tensor) -> dict:
        """Strategy figures for the report (histograms of the decisions); none by default."""
        return {}

    def describe(self) -> str:
        """One line on what was inserted (for listings such as the coverage table)."""
        return f"{sum(p.numel() for p in self.dyn.parameters())} params"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits with the decisions taken (kept in ``last_decisions``); in eval mode under inference mode."""
        self.check_input_size(x)
        routed = route_for_forward(self, x)
        self.last_decisions = routed.decisions
        return routed.logits

    def check_input_size(self, x: torch.Tensor) -> None:
        """Refuse images of another size than the conversion's, in one line: the inserted parts
        (exit heads, policy networks, stage sizes) were fitted to that size."""
        prep = getattr(self, "preprocess", None)
        if prep is None or x.dim() != 4 or tuple(x.shape[-2:]) == tuple(prep.input_size[-2:]):
            return
        h, w = prep.input_size[-2:]
        raise DynconvertError(
            f"this dynamic model was converted for {h}x{w} images and got {x.shape[-2]}x{x.shape[-1]}: "
            f"resize the images to {h}x{w}, or convert again with --set model.input_size=[H,W]"
        )

    def inserted_state(self) -> dict[str, torch.Tensor]:
        """The tensors of everything inserted (``dyn.*``), detached, on the CPU: what a save writes
        (on a CPU model they share memory with the model: clone them to keep a snapshot)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k.startswith(INSERTED_PREFIX)}

    def load_inserted_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load ``state`` into the inserted parts; return (missing keys, unexpected keys), loading
        nothing unless both are empty. A tensor of the wrong shape raises ``ValueError``."""
        own = {k: v for k, v in self.state_dict().items() if k.startswith(INSERTED_PREFIX)}
        missing = sorted(own.keys() - state.keys())
        unexpected = sorted(state.keys() - own.keys())
        for key in sorted(own.keys() & state.keys()):
            if own[key].shape != state[key].shape:
                raise ValueError(
                    f"saved tensor '{key}' has shape {tuple(state[key].shape)}, the rebuilt model expects "
                    f"{tuple(own[key].shape)}"
                )
        if not missing and not unexpected:
            self.load_state_dict(state, strict=False)
        return missing, unexpected
