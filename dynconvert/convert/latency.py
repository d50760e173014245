"""Measured cost tables: how long each part of a dynamic model takes on this device.

FLOPs say little about time for small operations: at batch 1 on a CPU an exit head and its
decision cost about as much time as a residual block, for a hundredth of its FLOPs. Calibration
with ``calibrate.cost: latency`` weighs exits by these times instead, so heads that do not pay
for themselves are turned off.
"""

from __future__ import annotations

import statistics
import time

import torch

from dynconvert.runtime.confidence import row_confidence


def _run_timed(fn, x: torch.Tensor):
    """``fn(x)`` and the seconds it took (waiting for the GPU where there is one)."""
    start = time.perf_counter()
    out = fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


@torch.inference_mode()
def early_exit_latency(dyn, images: torch.Tensor, repeats: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Median seconds per sample, at batch 1, of each backbone segment and of each head with its decision.

    ``images`` are a few normalised inputs; every part is timed on each of them, interleaved,
    ``repeats`` times, after one warm-up pass. Returns ``(segment_seconds, head_seconds)``.
    """
    segments, heads = dyn.segments, dyn.dyn.exits
    seg_times = [[] for _ in segments]
    head_times = [[] for _ in heads]

    def decide(k: int, h: torch.Tensor) -> bool:  # head k and its decision, as the batch-1 route runs them
        return row_confidence(heads[k](h)[0].tolist(), 1.0, dyn.criterion) >= 0.5

    for repeat in range(repeats + 1):
        for image in images:
            h = image[None]
            for k, segment in enumerate(segments):
                h, elapsed = _run_timed(segment, h)
                if k < len(heads):
                    _, spent = _run_timed(lambda f, k=k: decide(k, f), h)
                    if repeat:
                        head_times[k].append(spent)
                if repeat:
                    seg_times[k].append(elapsed)
    return (
        torch.tensor([statistics.median(t) for t in seg_times], dtype=torch.float64),
        torch.tensor([statistics.median(t) for t in head_times], dtype=torch.float64),
    )
