"""Evaluation on the held-out split: accuracy, FLOPs actually spent, and measured latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from dynconvert.progress import progress_bar
from dynconvert.toolkit.data import ImageSplit, Preprocess, normalize
from dynconvert.toolkit.train import batches


@torch.inference_mode()
def evaluate_static(model: nn.Module, split: ImageSplit, prep: Preprocess, batch_size: int, device: str) -> dict:
    """Top-1 accuracy of the original network on ``split``."""
    correct = 0
    for images, labels, _ in progress_bar(
        batches(split, prep, batch_size, device), desc="evaluate static", total=-(-len(split) // batch_size)
    ):
        correct += int((model(images).argmax(1) == labels).sum())
    return {"accuracy": correct / len(split), "samples": len(split)}


@torch.inference_mode()
def evaluate_dynamic(dyn, split: ImageSplit, prep: Preprocess, batch_size: int, device: str) -> dict:
    """Accuracy and FLOPs of the dynamic model with its decisions actually taken, batch by batch.

    The model supplies ``route(x)`` (logits and decisions), ``decision_record(routed)`` (one
    row per sample), ``flops_of(records)`` and ``summarize(records)`` (strategy-specific figures).
    """
    correct, records = 0, []
    for images, labels, _ in progress_bar(
        batches(split, prep, batch_size, device), desc="evaluate dynamic", total=-(-len(split) // batch_size)
    ):
        routed = dyn.route(images)
        correct += int((routed.logits.argmax(1) == labels).sum())
        records.append(routed.decisions.cpu())
    records = torch.cat(records)
    return {
        "accuracy": correct / len(split),
        "flops": float(dyn.flops_of(records).mean()),
        "samples": len(split),
        "decisions": records,
        **dyn.summarize(records),
    }


@torch.inference_mode()
def measure_latency(static: nn.Module, dyn: nn.Module, split: ImageSplit, prep: Preprocess, samples: int, device: str):
    """Batch-1 latency of both models on the same images, interleaved; medians in milliseconds."""
    samples = min(samples, len(split))
    if samples == 0:
        return None
    images = normalize(split.images[:samples].to(device), prep)
    for model in (static, dyn):  # warm-up
        for i in range(min(10, samples)):
            model(images[i : i + 1])
    times = {"static": [], "dynamic": []}
    for i in range(samples):
        x = images[i : i + 1]
        for key, model in (("static", static), ("dynamic", dyn)):
            start = time.perf_counter()
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    static_ms = statistics.median(times["static"]) * 1e3
    dynamic_ms = statistics.median(times["dynamic"]) * 1e3
    static_mean = statistics.fmean(times["static"]) * 1e3
    dynamic_mean = statistics.fmean(times["dynamic"]) * 1e3
    return {
        "batch_size": 1,
        "samples": samples,
        "static_median_ms": static_ms,
        "dynamic_median_ms": dynamic_ms,
        "static_mean_ms": static_mean,
        "dynamic_mean_ms": dynamic_mean,
        "time_ratio_mean": dynamic_mean / static_mean,
    }
