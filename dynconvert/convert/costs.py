"""FLOP counting: per module, per graph node and per segment, measured once on an example.

FLOPs here are 2 x multiply-accumulates of convolutions and matrix products, as counted by
``torch.utils.flop_counter``; element-wise work (norms, activations, additions) is not counted.
"""

from __future__ import annotations

from contextlib import contextmanager

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
