"""Exit points without graph cuts: the stage ends a timm model lists in its ``feature_info``.

The fallback when the traced graph has no point where a single tensor is alive, or cannot be
traced: heads then run from forward hooks (``runtime/stage_exits.py``). A stage that is a
``Sequential`` or ``ModuleList`` of blocks offers each of its blocks too, so the SDN-style FLOPs
fractions still find points near them.
"""

from __future__ import annotations

import torch
from torch import nn

from dynconvert.passes.analysis import CutPoint
from dynconvert.toolkit.costs import flops_at_modules


def feature_info_modules(model: nn.Module) -> list[str]:
    """Module names of the stages timm's ``feature_info`` lists (empty for other models)."""
    info = getattr(model, "feature_info", None)
    entries = info if isinstance(info, list) else getattr(info, "info", None) or []
    names = []
    for entry in entries:
        name = entry.get("module") if isinstance(entry, dict) else None
        if name and _has_module(model, name) and name not in names:
            names.append(name)
    return names


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _candidates(model: nn.Module) -> dict[str, str]:
    """Module name -> the stage it ends or belongs to (blocks of a container stage, else the stage)."""
    found = {}
    for stage in feature_info_modules(model):
        module = model.get_submodule(stage)
        children = [n for n, _ in module.named_children()] if isinstance(module, (nn.Sequential, nn.ModuleList)) else []
        for child in children:
            found[f"{stage}.{child}"] = stage
        if not children:
            found[stage] = stage
    return found


def stage_points(model: nn.Module, example: torch.Tensor, keep_last: bool = False) -> list[CutPoint]:
    """Exit candidates at feature_info stages and their blocks, in the order the forward pass reaches them.

    A candidate must run once per forward pass and output a per-sample map ``(C, H, W)`` /
    ``(H, W, C)`` or token sequence ``(T, D)``. The last block of a stage also answers to the
    stage's name, so a recipe may name either.
    """
    candidates = _candidates(model)
    if not candidates:
        return []
    reached = flops_at_modules(model, example, list(candidates))
    total = reached.pop("total") or 1.0
    last_of_stage = {}
    for name, stage in candidates.items():
        if name in reached:
            last_of_stage[stage] = name
    points = []
    for name in sorted(reached, key=lambda n: reached[n]["order"]):
        out, info = reached[name]["output"], reached[name]
        if info["calls"] != 1 or not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
            continue
        if out.shape[0] != example.shape[0]:
            continue
        stage = candidates[name]
        modules = [name] + ([stage] if last_of_stage.get(stage) == name and stage != name else [])
        points.append(
            CutPoint(
                node=name,
                modules=modules,
                shape=tuple(out.shape[1:]),
                flops_before=info["flops_before"],
                flops_fraction=info["flops_before"] / total,
            )
        )
    return points if keep_last else [p for p in points if p.flops_fraction < 0.999]
