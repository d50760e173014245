"""Measured cost tables: how long each part of a dynamic model takes where it will run.

FLOPs say little about time for small operations: at batch 1 on a CPU an exit head and its
decision cost about as much time as a residual block, for a hundredth of its FLOPs. Calibration
with ``calibrate.cost: latency`` weighs exits by these times instead, so heads that do not pay
for themselves are turned off. The times are measured in PyTorch on the conversion's device, or
in onnxruntime (``calibrate.latency_runtime: onnxruntime``) for a model deployed as ONNX.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from dynconvert.progress import progress_bar
from dynconvert.runtime.confidence import confidence, row_confidence


def _run_timed(fn, x):
    """``fn(x)`` and the seconds it took (waiting for the GPU where there is one)."""
    start = time.perf_counter()
    out = fn(x)
    if getattr(x, "is_cuda", False):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _time_chain(segments: list, decisions: list, inputs: list, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Median seconds of each segment and each exit decision, run as a chain (segment k's output
    feeds decision k and segment k + 1) on each input in turn, ``repeats`` times after a warm-up."""
    seg_times = [[] for _ in segments]
    head_times = [[] for _ in decisions]
    for repeat in range(repeats + 1):
        for h in inputs:
            for k, segment in enumerate(segments):
                h, elapsed = _run_timed(segment, h)
                if k < len(decisions):
                    _, spent = _run_timed(decisions[k], h)
                    if repeat:
                        head_times[k].append(spent)
                if repeat:
                    seg_times[k].append(elapsed)
    return (
        torch.tensor([statistics.median(t) for t in seg_times], dtype=torch.float64),
        torch.tensor([statistics.median(t) for t in head_times], dtype=torch.float64),
    )


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's intra-op thread count set to ``threads`` for the block (0: left as it is)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def early_exit_latency(
    dyn, images: torch.Tensor, repeats: int = 30, threads: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Median seconds per sample, at batch 1 in PyTorch, of each backbone segment and of each
    head with its decision.

    ``images`` are a few normalised inputs; every part is timed on each of them, interleaved,
    ``repeats`` times, after one warm-up pass, with ``threads`` intra-op threads (0: torch's
    current setting). Returns ``(segment_seconds, head_seconds)``.
    """
    heads = dyn.dyn.exits

    def decision(k: int):  # head k and its decision, as the batch-1 route runs them
        return lambda h: row_confidence(heads[k](h)[0].tolist(), 1.0, dyn.criterion) >= 0.5

    with _torch_threads(threads):
        return _time_chain(
            list(dyn.segments), [decision(k) for k in range(len(heads))], [x[None] for x in images], repeats
        )


class _ExitDecision(nn.Module):
    """An exit head and the comparison its decision ends in, as the exported graph computes them."""

    def __init__(self, head: nn.Module, criterion: str):
        super().__init__()
        self.head, self.criterion = head, criterion

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return confidence(self.head(h), self.criterion) >= 0.5


@torch.inference_mode()
def early_exit_onnx_latency(
    dyn, images: torch.Tensor, repeats: int = 30, threads: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`early_exit_latency` measured in onnxruntime (CPU): each segment, and each head with
    its decision, is exported on its own in the form ``dynconvert.export_onnx`` gives it (frozen
    BatchNorms, blocked-layout preparation), then timed at batch 1 with ``threads`` intra-op
    threads (0: onnxruntime's default). Each part pays for taking and giving plain-layout
    tensors, as it does at the boundaries of the exported graph's ``If`` branches.
    """
    from dynconvert.export.check import ort_session
    from dynconvert.export.frozen import frozen_copy
    from dynconvert.export.layout import prepare_layout
    from dynconvert.export.onnx_export import export_module

    if len(images) < 2:
        raise ValueError("timing in onnxruntime needs at least two example images (the batch is exported dynamic)")
    segments = [prepare_layout(frozen_copy(segment).cpu()) for segment in dyn.segments]
    decisions = [_ExitDecision(copy.deepcopy(head).cpu().eval(), dyn.criterion) for head in dyn.dyn.exits]
    segment_runs, decision_runs = [], []
    with tempfile.TemporaryDirectory(prefix="dynconvert-latency-") as folder:

        def exported(module: nn.Module, example: torch.Tensor, name: str):
            path = Path(folder) / f"{name}.onnx"
            export_module(module, example, path, ["y"])
            session = ort_session(path, threads)
            input_name = session.get_inputs()[0].name
            return lambda x: session.run(None, {input_name: x})[0]

        h = images[:2].cpu()
        for k, segment in enumerate(progress_bar(segments, desc="onnxruntime parts", unit="part")):
            segment_runs.append(exported(segment, h, f"segment{k}"))
            h = segment(h)
            if k < len(decisions):
                decision_runs.append(exported(decisions[k], h, f"exit{k}"))
    inputs = [x[None].cpu().numpy() for x in images]
    return _time_chain(segment_runs, decision_runs, inputs, repeats)
