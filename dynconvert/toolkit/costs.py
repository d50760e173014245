"""FLOP counting: per module, per graph node and per segment, measured once on an example.

FLOPs here are 2 x multiply-accumulates of convolutions and matrix products, as counted by
``torch.utils.flop_counter``; element-wise work (norms, activations, additions) is not counted.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

FLOPS_DEFINITION = (
    "FLOPs = 2 x multiply-accumulates of convolutions and matrix products (torch.utils.flop_counter), "
    "per sample; element-wise operations are not counted"
)


@contextmanager
def _parameters_without_grad(module):
    """FlopCounterMode fails on views of parameters that require grad (attention-pool latents)."""
    owner = module if isinstance(module, nn.Module) else getattr(module, "__self__", None)  # bound methods too
    params = [p for p in owner.parameters() if p.requires_grad] if isinstance(owner, nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one call of ``module`` on ``inputs``, divided by the batch size."""
    with torch.no_grad(), _parameters_without_grad(module), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops() / inputs[0].shape[0]


def node_flops(gm: fx.GraphModule, example: torch.Tensor) -> dict[str, float]:
    """FLOPs per sample of each node of ``gm``, by running it once under a counter."""
    per_node: dict[str, float] = {}

    class Counting(fx.Interpreter):
        def run_node(self, n):
            before = counter.get_total_flops()
            out = super().run_node(n)
            per_node[n.name] = (counter.get_total_flops() - before) / example.shape[0]
            return out

    with torch.no_grad(), _parameters_without_grad(gm), FlopCounterMode(display=False) as counter:
        Counting(gm).run(example)
    return per_node


def flops_at_modules(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, dict]:
    """Where the forward pass reaches each named module, measured in one run on ``example``.

    Returns, for each module that was called, ``{"flops_before": FLOPs per sample up to the end
    of its first call, "output": its first output, "calls": how many times it ran, "order": the
    rank of its first call}``, plus ``"total"``: the whole network's FLOPs per sample.
    """
    seen: dict[str, dict] = {}

    def record(name, module, inputs, output):
        if name in seen:
            seen[name]["calls"] += 1
            return
        flops = counter.get_total_flops() / example.shape[0]
        seen[name] = {"flops_before": flops, "output": output, "calls": 1, "order": len(seen)}

    handles = [model.get_submodule(n).register_forward_hook(partial(record, n)) for n in names]
    try:
        with torch.no_grad(), _parameters_without_grad(model), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return {**seen, "total": counter.get_total_flops() / example.shape[0]}
