"""The block-skipping dynamic model: residual blocks run only for the samples that keep them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dynconvert.runtime.dynamic import DynamicModel, Routed
from dynconvert.runtime.flat_graph import FlatRunners
from dynconvert.runtime.rows import memory_format_of, rows_where, select_rows


def run_sub_batches(full: nn.Module, skipped: nn.Module, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``full`` on the samples that keep the block, ``skipped`` on the rest, merged in order.

    Feature maps keep their memory format (channels-last stays channels-last) through the
    gather and the scatter, so no layout conversion is paid per block.
    """
    kept_rows = rows_where(keep)
    if kept_rows.numel() == h.shape[0]:
        return full(h)
    if kept_rows.numel() == 0:
        return skipped(h)
    skipped_rows = rows_where(~keep)
    out_kept = full(select_rows(h, kept_rows))
    out_skipped = skipped(select_rows(h, skipped_rows))
    out = torch.empty(
        (h.shape[0], *out_kept.shape[1:]),
        dtype=out_kept.dtype,
        device=out_kept.device,
        memory_format=memory_format_of(out_kept),
    )
    out.index_copy_(0, kept_rows, out_kept)
    out.index_copy_(0, skipped_rows, out_skipped)
    return out


def walk_units(x, units, skipped_units, droppable, settled, controller, bias, run_block) -> tuple[torch.Tensor, list]:
    """Run the units in turn, as the runtime and the exported graph both do.

    At a droppable block, a settled decision (``settled``, one per block: 1 always runs, -1
    never, 0 decided per sample) runs the block or its skipped form for every sample and its
    record is that decision; a controller whose decisions depend on each other (a recurrent
    gate) still steps through it, an independent one computes nothing. Otherwise the
    controller's keep-logit plus ``bias[index]`` goes to ``run_block(i, score, h) -> (output,
    record)``, ``i`` the unit's position. Returns the output and one record per droppable block.
    """
    independent = getattr(controller, "independent_decisions", False)
    state = controller.start(x)
    records, index, h = [], 0, x
    for i, (unit, skipped, is_droppable) in enumerate(zip(units, skipped_units, droppable)):
        if not is_droppable:
            h = unit(h)
            continue
        fixed = settled[index]
        if fixed:
            if not independent:
                _, state = controller.decide(index, h, state)
            h = unit(h) if fixed > 0 else skipped(h)
            records.append(torch.full((x.shape[0],), fixed > 0, dtype=torch.bool, device=x.device))
        else:
            logit, state = controller.decide(index, h, state)
            h, record = run_block(i, logit + bias[index], h)
            records.append(record)
        index += 1
    return h, records


def _run_block(full: nn.Module, skipped: nn.Module, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if h.shape[0] == 1:
        return full(h) if bool(keep) else skipped(h)
    return run_sub_batches(full, skipped, h, keep)


class BlockSkipModel(DynamicModel):
    """A backbone cut into units; droppable units run or are skipped per sample.

    Args:
        full: every unit as it is in the network.
        skipped: the same unit without its residual branch, or None for fixed units.
        corrections: per unit index, the skip correction its skipped form calls (optional).
        full_flops / skipped_flops: FLOPs per sample of each form (the cost table).
        controller: a ``DynModule`` with ``start(x) -> state`` and
            ``decide(index, h, state) -> (keep_logit, state)``; gates (SkipNet) or a policy
            network (BlockDrop). Its FLOPs per sample are ``controller_flops``.

    A block runs when ``keep_logit + dyn.bias[index] >= 0``; ``dyn.bias`` is fitted by calibration.
    """

    def __init__(
        self,
        full,
        skipped,
        full_flops,
        skipped_flops,
        controller: nn.Module,
        controller_flops: float,
        corrections: dict[int, nn.Module] | None = None,
    ):
        super().__init__()
        self.units = nn.ModuleList(full)
        self.skipped_units = nn.ModuleList(s if s is not None else nn.Identity() for s in skipped)
        self.droppable = [s is not None for s in skipped]
        self.full_flops = list(full_flops)
        self.skipped_flops = [f if d else 0.0 for f, d in zip(skipped_flops, self.droppable)]
        self.controller_flops = float(controller_flops)
        self.dyn = nn.Module()
        self.dyn.controller = controller
        self.dyn.register_buffer("bias", torch.zeros(self.num_blocks))
        if corrections:
            # the skipped forms call these same modules; under dyn. they are trained and saved
            self.dyn.corrections = nn.ModuleDict({str(i): m for i, m in corrections.items()})
        # per droppable block: 1 runs for every sample, -1 for none, 0 as decided (see settle)
        self.settled: list[int] = [0] * self.num_blocks
        self._unit_runners, self._skipped_runners = FlatRunners(), FlatRunners()

    @property
    def num_blocks(self) -> int:
        return sum(self.droppable)

    def inserted_parameters(self) -> list[nn.Parameter]:
        """What training learns: the controller's parameters and the skip corrections'."""
        params = list(self.dyn.controller.parameters())
        if hasattr(self.dyn, "corrections"):
            params += list(self.dyn.corrections.parameters())
        return params

    def static_flops(self) -> float:
        """FLOPs per sample of the original network."""
        return float(sum(self.full_flops))

    def inserted_flops(self) -> float:
        """FLOPs per sample of the gates or policy network."""
        return self.controller_flops

    def block_savings(self) -> torch.Tensor:
        """FLOPs saved per sample by skipping each droppable block."""
        return torch.tensor(
            [f - s for f, s, d in zip(self.full_flops, self.skipped_flops, self.droppable) if d], dtype=torch.float64
        )

    def sample_flops(self, kept: torch.Tensor) -> torch.Tensor:
        """FLOPs per sample (controller included) given which blocks ran, ``(batch, blocks)`` bool,
        or expected FLOPs given keep probabilities (float, differentiable)."""
        dtype = kept.dtype if kept.is_floating_point() else torch.float64
        savings = self.block_savings().to(device=kept.device, dtype=dtype)
        base = self.static_flops() + self.controller_flops - float(savings.sum())
        return base + kept.to(dtype) @ savings

    def route(self, x: torch.Tensor) -> Routed:
        """Run with hard decisions; a skipped block does not run for that sample."""
        if x.shape[0] == 1:
            if getattr(self.dyn.controller, "decides_at_start", False):
                return self._route_one(x)
            return self._route_one_stepwise(x)

        def hard(logit, unit, skipped, h):
            keep = logit >= 0
            return _run_block(unit, skipped, h, keep), keep

        h, kept = self._walk(x, hard, honour_settled=True, parts=self.runners())
        kept_matrix = torch.stack(kept, 1) if kept else x.new_zeros((x.shape[0], 0), dtype=torch.bool)
        return Routed(h, kept_matrix)

    def _route_one(self, x: torch.Tensor) -> Routed:
        """:meth:`route` for one sample when the controller decides every block from the input
        (a policy network): its decisions are read once, as Python booleans, rather than one
        tensor comparison per block; with every block settled the controller does not run."""
        keeps = [fixed > 0 for fixed in self.settled]
        if not all(self.settled):
            logits = self.dyn.controller.start(x) + self.dyn.bias
            keeps = [k if fixed else bool(v >= 0) for k, fixed, v in zip(keeps, self.settled, logits[0].tolist())]
        return Routed(self.run_fixed(x, keeps), torch.tensor([keeps], dtype=torch.bool, device=x.device))

    def _route_one_stepwise(self, x: torch.Tensor) -> Routed:
        """:meth:`route` for one sample when the controller decides block by block (gates): each
        decision is read as a Python number as the walk reaches its block, and the record is made
        once at the end, not as a tensor per block. Settled blocks ask no gate (a recurrent gate
        still steps through them, as in :func:`walk_units`)."""
        controller = self.dyn.controller
        steps_through = not getattr(controller, "independent_decisions", False)
        bias, settled = self.dyn.bias.tolist(), self.settled
        state = controller.start(x)
        # gates that need no state give their keep-logit as a number straight away, each through
        # a function on its weights asked for once per route
        forms = None if steps_through else getattr(controller, "keep_logit_forms", lambda: None)()

        def decide(index: int, h: torch.Tensor) -> bool:
            nonlocal state
            fixed = settled[index]
            if fixed and not steps_through:
                return fixed > 0
            if forms is not None:
                function, args = forms[index]
                logit = function(h, *args).item()
            else:
                logit_tensor, state = controller.decide(index, h, state)
                logit = logit_tensor.item()
            # added in Python (float64), the sum has the sign the float32 sum has: the decision
            # is the one the tensor comparison of the batched path makes
            return fixed > 0 if fixed else logit + bias[index] >= 0

        h, keeps = self._run_deciding(x, decide)
        return Routed(h, torch.tensor([keeps], dtype=torch.bool, device=x.device))

    def run_fixed(self, x: torch.Tensor, keeps: list[bool], parts=None) -> torch.Tensor:
        """The network with the same decisions for every sample, one Python bool per droppable
        block: kept blocks run in full, the others in their skipped form; no controller runs.
        ``parts``: what runs the units and their skipped forms (default: :meth:`runners`)."""
        return self._run_deciding(x, lambda index, h: keeps[index], parts)[0]

    def _run_deciding(self, x: torch.Tensor, decide, parts=None) -> tuple[torch.Tensor, list[bool]]:
        """The units in turn; at droppable block ``index`` (input ``h``), ``decide(index, h)``
        says whether it runs in full or in its skipped form. Returns the output and the decisions.
        ``parts``: what runs the units and their skipped forms (default: :meth:`runners`)."""
        h, index, keeps = x, 0, []
        for unit, skipped, droppable in zip(*(parts or self.runners()), self.droppable):
            if droppable:
                keep = decide(index, h)
                keeps.append(keep)
                h = unit(h) if keep else skipped(h)
                index += 1
            else:
                h = unit(h)
        return h, keeps

    def _walk(self, x: torch.Tensor, run_block, honour_settled: bool = False, parts=None) -> tuple[torch.Tensor, list]:
        """:func:`walk_units` over this model's units; ``run_block(score, unit, skipped, h) ->
        (output, record)``. Without ``honour_settled`` every block is decided by the controller.
        ``parts``: what runs the units and their skipped forms (default: the modules themselves)."""
        settled = self.settled if honour_settled else [0] * self.num_blocks
        units, skipped = parts or (self.units, self.skipped_units)
        return walk_units(
            x,
            units,
            skipped,
            self.droppable,
            settled,
            self.dyn.controller,
            self.dyn.bias,
            lambda i, score, h: run_block(score, units[i], skipped[i], h),
        )

    def runners(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """What runs each unit and each skipped form in :meth:`route`: a flat runner of it
        (``runtime/flat_graph.py``), the same graph over the same modules with one attribute
        lookup per layer."""
        return self._unit_runners.of(self.units), self._skipped_runners.of(self.skipped_units)

    def settle(self, kept: torch.Tensor) -> None:
        """Fix the decision of every block that ``kept`` (decisions on calibration data, (samples,
        blocks)) shows running for all samples or for none; the others stay decided per sample."""
        self.settled = settled_decisions(kept)

    def route_with(self, x: torch.Tensor, keep: torch.Tensor) -> Routed:
        """Run with decisions given as a ``(batch, blocks)`` bool matrix; the controller is not used.

        Skipped blocks do not run for their samples, as in :meth:`route`. Gradients flow into
        the blocks that ran. Example: ``dyn.route_with(x, torch.ones(len(x), dyn.num_blocks, dtype=torch.bool))``
        is the original network.
        """
        if keep.shape != (x.shape[0], self.num_blocks):
            raise ValueError(f"keep must have shape {(x.shape[0], self.num_blocks)}, got {tuple(keep.shape)}")
        keep = keep.to(device=x.device, dtype=torch.bool)
        index, h = 0, x
        for unit, skipped, droppable in zip(self.units, self.skipped_units, self.droppable):
            if droppable:
                h = _run_block(unit, skipped, h, keep[:, index])
                index += 1
            else:
                h = unit(h)
        return Routed(h, keep)

    def register_tuned_units(self, indices: list[int]) -> None:
        """Expose the units at ``indices`` (fine-tuned backbone parts) under ``dyn.tuned``.

        What lives under ``dyn.`` is what is saved, so a fine-tuned backbone survives
        save and load; the modules are shared, not copied.
        """
        self.dyn.tuned = nn.ModuleDict({str(i): self.units[i] for i in sorted(set(indices))})

    def forward_relaxed(self, x: torch.Tensor, noise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: hard decisions forward, straight-through gradients backward.

        Returns (logits, keep probabilities of shape (batch, blocks)). Gumbel (logistic) noise
        on the logits when ``noise``.
        """

        def relaxed(logit, unit, skipped, h):
            if noise:
                u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
                logit = logit + torch.log(u) - torch.log1p(-u)
            p = torch.sigmoid(logit)
            gate = (p >= 0.5).to(p.dtype) + p - p.detach()
            skip_out = skipped(h)
            return skip_out + gate.view((-1,) + (1,) * (skip_out.dim() - 1)) * (unit(h) - skip_out), p

        h, probs = self._walk(x, relaxed)
        return h, torch.stack(probs, 1)

    def forward_sampled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """REINFORCE pass: each keep decision is sampled from its gate's keep probability and the
        network runs with it (skipped blocks really skipped, gradients into what ran).

        Returns (logits, log-probabilities of the sampled decisions and the decisions, both of
        shape (batch, blocks)).
        """

        def sampled(logit, unit, skipped, h):
            keep = torch.bernoulli(torch.sigmoid(logit.detach())).bool()
            log_prob = torch.where(keep, F.logsigmoid(logit), F.logsigmoid(-logit))
            return _run_block(unit, skipped, h, keep), (log_prob, keep)

        h, records = self._walk(x, sampled)
        return h, torch.stack([r[0] for r in records], 1), torch.stack([r[1] for r in records], 1)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.dyn.parameters())
        return f"{self.num_blocks} of {len(self.droppable)} units gated, {params} params"

    def flops_of(self, kept: torch.Tensor) -> torch.Tensor:
        return self.sample_flops(kept)

    def summarize(self, kept: torch.Tensor) -> dict:
        """Blocks used per sample (mean, spread, histogram), per-block execution rates, and
        the number of distinct block patterns seen."""
        used = kept.sum(1)
        return {
            "blocks_total": self.num_blocks,
            "blocks_used_mean": float(used.float().mean()),
            "blocks_used_std": float(used.float().std()) if len(used) > 1 else 0.0,
            "blocks_used_histogram": torch.bincount(used, minlength=self.num_blocks + 1).tolist(),
            "block_execution_rate": kept.float().mean(0).tolist(),
            "distinct_policies": int(torch.unique(kept, dim=0).shape[0]),
        }

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The original network: every unit in full."""
        for unit in self.units:
            x = unit(x)
        return x


def settled_decisions(kept: torch.Tensor) -> list[int]:
    """Per block, from decisions on calibration data ``(samples, blocks)``: 1 where it ran for
    every sample, -1 where for none, 0 where it was decided per sample."""
    rates = kept.float().mean(0)
    return [1 if r == 1.0 else -1 if r == 0.0 else 0 for r in rates.tolist()]
