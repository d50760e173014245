"""Traced segments run with one attribute lookup per layer, on code they share.

A segment cut from a traced network keeps the network's module hierarchy, so its generated code
reaches a layer through the chain of containers above it (``getattr(self.layer1, "4").conv1``),
each step a slow ``nn.Module.__getattr__``. At batch 1 those lookups cost several percent of a
ResNet-56's time. A flat runner runs the same graph over the same module objects, each registered
once under a flat name, so the generated code reaches it in one lookup. The segment itself keeps
its hierarchy: its state-dict names, its graph and everything that reads them stay as they are.

Layers and values are named by position (``m0``, ``m1``, ...), so runners of segments with the
same structure (the blocks of a stage, their skipped forms) generate the same code, and they run
one function object for it rather than a compiled copy each: like the static network's one
``forward`` per block class, its bytecode stays warm across the blocks, which at batch 1 is worth
several percent of the time. Identity layers (a residual block's plain shortcut) are left out:
their input is their output. A runner is called straight into that function: the module-call
machinery (hooks, the wrapped call) is for the segment, not for the runner that stands in for it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import fx, nn

# generated code (with the objects its globals name) -> the one function that runs it
_SHARED_CODE: dict[tuple, Callable] = {}


def flat_runner(segment: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule that runs ``segment``'s graph on ``segment``'s own modules and tensors
    (shared, not copied: moving or loading ``segment`` moves what the runner computes with),
    each module reached through one attribute of the runner. Calling it runs its code directly,
    without forward hooks of its own (hooks on the segment's layers still fire)."""
    graph = copy.deepcopy(segment.graph)
    holders = nn.Module()
    owners: dict[str, str] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and _passes_through(segment.get_submodule(node.target)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_module":
            node.target = _hold(holders, owners, segment, node.target)
        elif node.op == "get_attr":
            owner, _, field = node.target.rpartition(".")
            node.target = f"{_hold(holders, owners, segment, owner)}.{field}"
    for position, node in enumerate(graph.nodes):
        node._rename(f"v{position}")
        if node.op == "placeholder":  # the argument's name is in the code too
            node.target = node.name
    runner = fx.GraphModule(holders, graph, class_name=f"Flat{type(segment).__name__}")
    # GraphModule copies a get_attr target's tensor itself: put its owner back in its place, so
    # the runner reads the tensor the segment holds now, after any move or load
    for name in owners.values():
        setattr(runner, name, holders.get_submodule(name))
    cls = type(runner)  # GraphModule makes a class per instance: changing it changes this runner only
    cls.forward = _shared(runner.code, cls.forward)
    cls.__call__ = cls.forward
    return runner


def _passes_through(module: nn.Module) -> bool:
    """Whether calling ``module`` returns its one input unchanged (an identity shortcut), so
    the runner can use the input itself; a module with hooks is called, for its hooks."""
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Sequential) and len(module) == 0)


def _shared(code: str, forward: Callable) -> Callable:
    """The function every runner with this ``code`` runs (``forward`` for the first one)."""
    named = tuple(sorted((k, id(v)) for k, v in forward.__globals__.items() if k != "__builtins__"))
    return _SHARED_CODE.setdefault((code, named), forward)


def _hold(holders: nn.Module, owners: dict[str, str], segment: nn.Module, path: str) -> str:
    """The flat name under which ``holders`` keeps ``segment``'s submodule at ``path`` ("" is
    ``segment`` itself), registering it on first use."""
    if path not in owners:
        name = f"m{len(owners)}"
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
        members = list(modules)
        if members != self._modules:  # modules compare by identity
            self._modules = members
            self._runners = runners_for(members)
        if any(m._forward_hooks or m._forward_pre_hooks for m in members):
            return [m if m._forward_hooks or m._forward_pre_hooks else r for m, r in zip(members, self._runners)]
        return self._runners
