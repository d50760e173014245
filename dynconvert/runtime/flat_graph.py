"""Traced segments run with one attribute lookup per layer.

A segment cut from a traced network keeps the network's module hierarchy, so its generated code
reaches a layer through the chain of containers above it (``getattr(self.layer1, "4").conv1``),
each step a slow ``nn.Module.__getattr__``. At batch 1 those lookups cost several percent of a
ResNet-56's time. A flat runner runs the same graph over the same module objects, each registered
once under a flat name, so the generated code reaches it in one lookup. The segment itself keeps
its hierarchy: its state-dict names, its graph and everything that reads them stay as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn


def flat_runner(segment: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule that runs ``segment``'s graph on ``segment``'s own modules and tensors
    (shared, not copied: moving or loading ``segment`` moves what the runner computes with),
    each module reached through one attribute of the runner."""
    graph = copy.deepcopy(segment.graph)
    holders = nn.Module()
    owners: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            node.target = _hold(holders, owners, segment, node.target)
        elif node.op == "get_attr":
            owner, _, field = node.target.rpartition(".")
            node.target = f"{_hold(holders, owners, segment, owner)}.{field}"
    runner = fx.GraphModule(holders, graph, class_name=f"Flat{type(segment).__name__}")
    # GraphModule copies a get_attr target's tensor itself: put its owner back in its place, so
    # the runner reads the tensor the segment holds now, after any move or load
    for name in owners.values():
        setattr(runner, name, holders.get_submodule(name))
    return runner


def _hold(holders: nn.Module, owners: dict[str, str], segment: nn.Module, path: str) -> str:
    """The flat name under which ``holders`` keeps ``segment``'s submodule at ``path`` ("" is
    ``segment`` itself), registering it on first use."""
    if path not in owners:
        name = f"m{len(owners)}_{path.replace('.', '_')}" if path else f"m{len(owners)}"
        holders.add_module(name, segment.get_submodule(path))
        owners[path] = name
    return owners[path]


def runners_for(segments: list[nn.Module]) -> list[nn.Module]:
    """A flat runner for each traced segment (other modules stand for themselves)."""
    return [flat_runner(s) if isinstance(s, fx.GraphModule) else s for s in segments]


class FlatRunners:
    """Flat runners of a list of modules, built once and again only when the list's members
    change. A module with forward hooks runs itself (its hooks fire on its own calls), and so
    does every module while torch.compile or torch.export traces."""

    def __init__(self):
        self._modules: list[nn.Module] = []
        self._runners: list[nn.Module] = []

    def of(self, modules) -> list[nn.Module]:
        """What runs each of ``modules`` (an ``nn.ModuleList`` or a list), in order."""
        if torch.compiler.is_compiling():
            return list(modules)
        if len(self._modules) != len(modules) or any(a is not b for a, b in zip(self._modules, modules)):
            self._modules = list(modules)
            self._runners = runners_for(self._modules)
        return [m if m._forward_hooks or m._forward_pre_hooks else r for m, r in zip(self._modules, self._runners)]
