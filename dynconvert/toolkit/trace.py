"""Trace a network with torch.fx, treating timm's untraceable modules and ours as leaves."""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from dynconvert.errors import DynconvertError


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps given module types and module names as single nodes."""

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: tuple[str, ...] = ()):
        from timm.layers._fx import get_notrace_functions

        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaf_modules: list[str] | tuple[str, ...] = (), example: torch.Tensor | None = None):
    """Trace ``model`` into a GraphModule; propagate shapes when ``example`` is given.

    ``leaf_modules`` names submodules (qualified names) not to trace into.
    """
    from timm.layers._fx import get_notrace_modules

    from dynconvert.runtime.modules import DynModule

    tracer = LeafTracer(tuple(get_notrace_modules()) + (DynModule,), tuple(leaf_modules))
    try:
        graph = tracer.trace(model, concrete_args=_optional_arguments(model))
    except Exception as exc:
        where = _innermost_module(exc)
        raise DynconvertError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}"
            f"{where}; declare the offending submodule a leaf with --set model.leaf_modules=[NAME]"
        ) from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Traced")
    if example is not None:
        ShapeProp(gm).propagate(example)
    return gm


def _optional_arguments(model: nn.Module) -> dict:
    """Fix every forward argument after the input to its default (timm's ViT takes masks)."""
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _innermost_module(exc: Exception) -> str:
    tb = exc.__traceback__
    names = []
    while tb is not None:
        self_obj = tb.tb_frame.f_locals.get("self")
        if isinstance(self_obj, nn.Module):
            names.append(type(self_obj).__name__)
        tb = tb.tb_next
    return f" (inside {names[-1]})" if names else ""
