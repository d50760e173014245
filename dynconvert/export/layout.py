"""Prepare a graph for onnxruntime's blocked (NCHWc) convolution layout.

onnxruntime runs convolutions on CPU in a blocked layout and, where a residual sum's operands
are all in that layout, fuses the sum and the ReLU after it into the convolution. An operand
that comes from anywhere else (the input of a graph or of an ``If`` branch, a padded shortcut,
a gathered sub-batch) is in plain NCHW: the sum then runs unfused, its result stays NCHW, and
so does every residual sum downstream until the next pooling. Passing such an operand through
a 1x1 max-pooling (an identity) puts it in the blocked layout: one cheap pass over the tensor
instead of two reorders, an addition and a ReLU per block.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from dynconvert.export.frozen import FoldedCorrection, FrozenBatchNorm

_SUMS = {operator.add, operator.iadd, torch.add}
_ACTIVATIONS = {F.relu, torch.relu}
_POOLS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d}
# modules whose output is in the blocked layout when their input is (or always, for convolutions)
_BLOCKED_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, FoldedCorrection)
_PASS_THROUGH_MODULES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm, nn.ReLU, nn.Identity)


def blocked_identity(x: torch.Tensor) -> torch.Tensor:
    """The identity, written as a 1x1 max-pooling for a 4-D map (other tensors pass as they are)."""
    return F.max_pool2d(x, 1) if x.dim() == 4 else x


def keep_blocked_layout(gm: fx.GraphModule, input_blocked: bool = False) -> fx.GraphModule:
    """Route every residual-sum operand that onnxruntime would hold in plain layout through
    :func:`blocked_identity`, in place; returns ``gm``. The computed values do not change.

    ``input_blocked``: the graph's inputs arrive in the blocked layout (the output of a block
    run just before, in the same graph level), so they need no identity of their own.
    """
    blocked: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if _is_blocked(gm, node, blocked) or (input_blocked and node.op == "placeholder"):
            blocked.add(node)
        if not _is_sum(node):
            continue
        operands = list(dict.fromkeys(a for a in node.args if isinstance(a, fx.Node)))
        if not any(a in blocked for a in operands):
            continue
        for operand in operands:
            if operand in blocked or operand.op == "get_attr":
                continue
            # every use reads the wrapped value, so a convolution reading the same tensor
            # shares its layout conversion
            with gm.graph.inserting_after(operand):
                identity = gm.graph.call_function(blocked_identity, (operand,))
            operand.replace_all_uses_with(identity, delete_user_cb=lambda user, identity=identity: user is not identity)
            blocked.add(identity)
        blocked.add(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def prepare_layout(module: nn.Module, input_blocked: bool = False) -> nn.Module:
    """:func:`keep_blocked_layout` on every graph module within ``module`` (itself included), in place."""
    for child in module.modules():
        if isinstance(child, fx.GraphModule):
            keep_blocked_layout(child, input_blocked)
    return module


def _is_sum(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SUMS and len(node.args) == 2


def _is_blocked(gm: fx.GraphModule, node: fx.Node, blocked: set[fx.Node]) -> bool:
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _BLOCKED_MODULES):
            return True
        return isinstance(module, _PASS_THROUGH_MODULES) and first in blocked
    if node.op == "call_function":
        if node.target is F.conv2d or node.target in _POOLS or node.target is blocked_identity:
            return True
        return node.target in _ACTIVATIONS and first in blocked
    if node.op == "call_method":
        return node.target in ("relu", "relu_") and first in blocked
    return False
