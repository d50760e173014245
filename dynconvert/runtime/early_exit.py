"""The early-exit dynamic model: segments of the backbone with an exit head after each but the last."""

from __future__ import annotations

import torch
from torch import nn

from dynconvert.runtime.confidence import confidence, row_confidence
from dynconvert.runtime.cost_table import exit_cost_table
from dynconvert.runtime.dynamic import DynamicModel, Routed
from dynconvert.runtime.flat_graph import FlatRunners
from dynconvert.runtime.folding import foldings_held, foldings_unchanged
from dynconvert.runtime.rows import rows_where, select_rows


class EarlyExitModel(DynamicModel):
    """Runs backbone segments in turn; after each, samples confident enough leave the batch.

    Args:
        segments: consecutive parts of the backbone, each taking the previous one's output.
        heads: one exit head per segment but the last.
        segment_flops / head_flops: FLOPs per sample of each segment and head (the cost table).
        criterion: ``"max_softmax"`` or ``"entropy"``.

    ``thresholds`` (a buffer, one per exit) start at 2.0, above any confidence, so an
    unconverted model never exits and equals the original network.
    """

    def __init__(
        self,
        segments: list[nn.Module],
        heads: list[nn.Module],
        segment_flops: list[float],
        head_flops: list[float],
        criterion: str = "max_softmax",
        check_segments: bool = True,
    ):
        super().__init__()
        if check_segments and len(segments) != len(heads) + 1:
            raise ValueError("need exactly one more segment than exit heads")
        self.segments = nn.ModuleList(segments)
        self.dyn = nn.Module()
        self.dyn.exits = nn.ModuleList(heads)
        self.dyn.register_buffer("thresholds", torch.full((len(heads),), 2.0))
        self.dyn.register_buffer("temperatures", torch.ones(len(heads)))
        self.segment_flops = list(segment_flops)
        self.head_flops = list(head_flops)
        self.criterion = criterion
        self._runners = FlatRunners()
        self._single_sample: tuple = (None, [])  # (the heads' foldings held, each head's single-sample form)

    @property
    def num_exits(self) -> int:
        return len(self.dyn.exits)

    def runners(self) -> list[nn.Module]:
        """What runs each segment: a flat runner of it (``runtime/flat_graph.py``), the same
        graph over the same modules with one attribute lookup per layer."""
        return self._runners.of(self.segments)

    def flops_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(FLOPs per sample of each segment, of each head), float64: the cost table."""
        return (
            torch.tensor(self.segment_flops, dtype=torch.float64),
            torch.tensor(self.head_flops, dtype=torch.float64),
        )

    def exit_costs(self, thresholds: torch.Tensor | None = None) -> torch.Tensor:
        """FLOPs per sample of leaving at exit k (k = num_exits: the full network), counting the
        heads that run: those whose threshold (``thresholds``, default the model's own) can be
        reached (at most 1)."""
        thresholds = self.dyn.thresholds if thresholds is None else thresholds
        return exit_cost_table(*self.flops_table(), thresholds.detach().cpu() <= 1.0)

    def route(self, x: torch.Tensor) -> Routed:
        """Run with early exits; return the logits and the exit each sample took.

        Heads whose threshold is above 1 can never be taken and are not computed.
        """
        thresholds = self.dyn.thresholds.tolist()
        temperatures = self.dyn.temperatures.tolist()
        segments = self.runners()
        if x.shape[0] == 1:
            return self._route_single(x, segments, thresholds, temperatures)
        batch = x.shape[0]
        logits_out: torch.Tensor | None = None
        exits = torch.full((batch,), self.num_exits, dtype=torch.long, device=x.device)
        remaining = torch.arange(batch, device=x.device)
        h = x
        for k in range(self.num_exits):
            h = segments[k](h)
            if thresholds[k] > 1.0:
                continue
            logits = self.dyn.exits[k](h)
            if logits_out is None:
                logits_out = logits.new_empty((batch, logits.shape[1]))
            leave = confidence(logits / temperatures[k], self.criterion) >= thresholds[k]
            leaving_rows = rows_where(leave)
            if leaving_rows.numel():
                remaining, h = _leave(logits_out, exits, k, logits, leaving_rows, rows_where(~leave), remaining, h)
                if remaining.numel() == 0:
                    return Routed(logits_out, exits)
        final = segments[-1](h)
        if logits_out is None:
            return Routed(final, exits)
        logits_out.index_copy_(0, remaining, final)
        return Routed(logits_out, exits)

    def route_stream(self, x: torch.Tensor, batch_size: int = 64) -> Routed:
        """Throughput mode for many inputs at once: every segment runs in full batches.

        In :meth:`route`, the samples still in after a few exits form ever smaller batches,
        and small batches cost more per sample. Here all of ``x`` goes through segment 0 in
        batches of ``batch_size``; the samples that stay are batched again for segment 1, and
        so on, so each segment sees full batches (but the last). Per sample, logits and exits
        are those of :meth:`route`. Memory: one segment's output for every sample still in.
        """
        thresholds = self.dyn.thresholds.tolist()
        temperatures = self.dyn.temperatures.tolist()
        segments = self.runners()
        n = x.shape[0]
        exits = torch.full((n,), self.num_exits, dtype=torch.long, device=x.device)
        remaining = torch.arange(n, device=x.device)
        logits_out: torch.Tensor | None = None
        h = x
        for k in range(self.num_exits + 1):
            h = _in_batches(segments[k], h, batch_size)
            if k == self.num_exits:
                break
            if thresholds[k] > 1.0:
                continue
            logits = _in_batches(self.dyn.exits[k], h, batch_size)
            if logits_out is None:
                logits_out = logits.new_empty((n, logits.shape[1]))
            leave = confidence(logits / temperatures[k], self.criterion) >= thresholds[k]
            leaving_rows = rows_where(leave)
            if leaving_rows.numel():
                remaining, h = _leave(logits_out, exits, k, logits, leaving_rows, rows_where(~leave), remaining, h)
                if remaining.numel() == 0:
                    return Routed(logits_out, exits)
        if logits_out is None:
            return Routed(h, exits)
        logits_out.index_copy_(0, remaining, h)
        return Routed(logits_out, exits)

    def _route_single(
        self, x: torch.Tensor, segments: list, thresholds: list[float], temperatures: list[float]
    ) -> Routed:
        forms, h = self._single_sample_heads(), x
        for k in range(self.num_exits):
            h = segments[k](h)
            if thresholds[k] > 1.0:
                continue
            function, args = forms[k]
            logits = function(h, *args)
            if row_confidence(logits.tolist()[0], temperatures[k], self.criterion) >= thresholds[k]:
                return Routed(logits, torch.full((1,), k, dtype=torch.long, device=x.device))
        return Routed(segments[-1](h), torch.full((1,), self.num_exits, dtype=torch.long, device=x.device))

    def _single_sample_heads(self) -> list[tuple]:
        """Per exit, ``(function, args)`` giving one sample's logits as ``function(h, *args)``: the
        head's :meth:`ExitHead.single_sample_form`, or the head itself. Asked of the heads once and
        reused while their foldings hold (``runtime/folding.py: foldings_unchanged``), so a route
        checks every head's weights in one pass rather than each head on every call."""
        heads = self.dyn.exits
        held, forms = self._single_sample
        # torch.compile and torch.export trace the heads themselves (they cannot ask about inference mode)
        reusable = torch.is_inference_mode_enabled() and not torch.compiler.is_compiling()
        if reusable and held is not None and foldings_unchanged(heads, held):
            return forms
        forms = [head.single_sample_form() if hasattr(head, "single_sample_form") else (head, ()) for head in heads]
        # a head that runs itself (hooks, no folding) is asked again next time
        cacheable = reusable and all(form[0] is not head for form, head in zip(forms, heads))
        self._single_sample = (foldings_held(heads) if cacheable else None, forms)
        return forms

    def forward_all(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every segment and every head, no exits taken: (final logits, exit logits per head)."""
        outs, h, segments = [], x, self.runners()
        for k in range(self.num_exits):
            h = segments[k](h)
            outs.append(self.dyn.exits[k](h))
        return segments[-1](h), outs

    def forward_all_flat(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``forward_all`` as one list: final logits first, then each exit's logits."""
        final, exits = self.forward_all(x)
        return [final, *exits]

    def exit_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(final logits, each head's parameter-free features): what a frozen backbone lets us cache."""
        feats, h, segments = [], x, self.runners()
        for k in range(self.num_exits):
            h = segments[k](h)
            feats.append(self.dyn.exits[k].features(h))
        return segments[-1](h), feats

    def flops_of(self, exits: torch.Tensor) -> torch.Tensor:
        """FLOPs per sample for the exits taken."""
        return self.exit_costs().to(exits.device)[exits]

    def summarize(self, exits: torch.Tensor) -> dict:
        """Report figures: how many samples left at each exit (the last: the full network)."""
        return {"exit_histogram": torch.bincount(exits, minlength=self.num_exits + 1).tolist()}

    def describe(self) -> str:
        params = sum(p.numel() for p in self.dyn.parameters())
        fallback = str(self.plan.get("insertion", "")).startswith("feature_info")
        return f"{self.num_exits} exits{' on feature_info stages (fallback)' if fallback else ''}, {params} params"

    def inserted_flops(self) -> float:
        """FLOPs per sample of all exit heads (what a sample that runs to the end pays extra)."""
        return float(sum(self.head_flops))

    def static_flops(self) -> float:
        """FLOPs per sample of the original network (all segments, no heads)."""
        return float(sum(self.segment_flops))


def _leave(logits_out, exits, k, logits, leaving_rows, staying_rows, remaining, h):
    """Samples at ``leaving_rows`` of the current batch leave at exit ``k``: their ``logits`` are
    written into ``logits_out`` and ``exits`` at their place in the full batch (``remaining``
    maps current rows to it). Returns ``remaining`` and ``h`` of the samples that stay."""
    leaving = remaining.index_select(0, leaving_rows)
    logits_out.index_copy_(0, leaving, logits.index_select(0, leaving_rows))
    exits.index_fill_(0, leaving, k)
    return remaining.index_select(0, staying_rows), select_rows(h, staying_rows)


def _in_batches(module: nn.Module, h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``module`` over ``h`` in consecutive batches of ``batch_size``, concatenated."""
    if h.shape[0] <= batch_size:
        return module(h)
    return torch.cat([module(part) for part in h.split(batch_size)])
