"""Find residual units (``shortcut(x) + residual(x)``) and build their skipped form.

Between two consecutive nodes after which a single tensor is alive lies a unit of the
network. It is *droppable* when it contains an addition whose two operands both come from
the unit's input by different paths: the cheaper path is the shortcut (identity,
subsample-and-pad, projection), the costlier one the residual branch. Dropping the unit keeps
the shortcut and everything after the addition (a final ReLU, say) and removes the branch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from dynconvert.passes.analysis import _scopes, single_live_nodes
from dynconvert.passes.segments import extract_segment

_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class Unit:
    """A consecutive piece of the network between two single-tensor points.

    ``start`` is None for the first unit (it begins at the input), ``end`` None for the last
    (it runs to the output). ``add_node`` is set for droppable units.
    """

    start: str | None
    end: str | None
    name: str
    add_node: str | None = None
    shortcut_operand: int | None = None

    @property
    def droppable(self) -> bool:
        return self.add_node is not None


def _ancestors(node: fx.Node, stop: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo.extend(a for a in n.all_input_nodes)
    return seen


def find_units(gm: fx.GraphModule, flops_per_node: dict[str, float]) -> list[Unit]:
    """Cut ``gm`` at every point where one tensor is alive; classify and merge the pieces."""
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    position = {n: i for i, n in enumerate(nodes)}
    cuts = [
        n
        for n in single_live_nodes(gm.graph)
        if n.op != "placeholder" and len(getattr(n.meta.get("tensor_meta"), "shape", ())) >= 3
    ]
    units, previous, seen = [], None, {}
    for cut in [*cuts, None]:
        lo = position[previous] + 1 if previous is not None else 0
        hi = position[cut] + 1 if cut is not None else len(nodes)
        body = nodes[lo:hi]
        add, operand = _residual_add(body, previous, flops_per_node)
        name = _unit_name(body, cut)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        units.append(Unit(previous.name if previous else None, cut.name if cut else None, name, add, operand))
        previous = cut
    return _merge_fixed(units)


def _residual_add(body, start, flops_per_node) -> tuple[str | None, int | None]:
    """The last addition in ``body`` whose operands both come from ``start`` by different paths."""
    if start is None:
        return None, None
    members = set(body)
    for n in reversed(body):
        if n.op != "call_function" or n.target not in _ADDS or len(n.args) != 2:
            continue
        a, b = n.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        if not (_depends_on(a, start, members) and _depends_on(b, start, members)):
            continue
        anc_a, anc_b = _ancestors(a, {start}) & members, _ancestors(b, {start}) & members
        cost_a = sum(flops_per_node.get(x.name, 0.0) for x in anc_a - anc_b)
        cost_b = sum(flops_per_node.get(x.name, 0.0) for x in anc_b - anc_a)
        if cost_a != cost_b:
            return n.name, 0 if cost_a < cost_b else 1
    return None, None


def _depends_on(node: fx.Node, start: fx.Node, members: set[fx.Node]) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is start:
            return True
        if n in seen or n not in members:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _unit_name(body, cut) -> str:
    scopes = [s for n in body for s in _scopes(n)]
    common = [s for s in dict.fromkeys(scopes) if all(s in _scopes(n) for n in body if _scopes(n))]
    if common:
        return common[-1]
    return cut.name if cut is not None else "head"


def _merge_fixed(units: list[Unit]) -> list[Unit]:
    """Fold each fixed piece into the unit before it (a block's final activation belongs to the
    block and stays in its skipped form); join the fixed pieces before the first block."""
    merged: list[Unit] = []
    for unit in units:
        if merged and not unit.droppable:
            last = merged[-1]
            name = last.name if last.droppable else f"{last.name}+{unit.name}"
            merged[-1] = Unit(last.start, unit.end, name, last.add_node, last.shortcut_operand)
        else:
            merged.append(unit)
    return merged


def shortcut_shape(gm: fx.GraphModule, unit: Unit) -> tuple[int, ...] | None:
    """Per-sample shape of the shortcut operand of a droppable unit's addition (from shape propagation)."""
    add = next(n for n in gm.graph.nodes if n.name == unit.add_node)
    meta = add.args[unit.shortcut_operand].meta.get("tensor_meta")
    return tuple(meta.shape[1:]) if meta is not None else None


def skipped_form(gm: fx.GraphModule, unit: Unit, correction: torch.nn.Module | None = None) -> fx.GraphModule:
    """The unit with its residual branch removed: the addition returns the shortcut alone, or,
    with a ``correction`` module, ``correction(shortcut)`` in its place (a
    :class:`~dynconvert.runtime.corrections.SkipCorrection` gives ``shortcut + map(shortcut)``;
    the module is shared, not copied)."""
    segment = extract_segment(gm, unit.start, unit.end)
    add = next(n for n in segment.graph.nodes if n.name == unit.add_node)
    shortcut = add.args[unit.shortcut_operand]
    if correction is not None:  # the correction computes what the addition did: shortcut + map(shortcut)
        segment.add_submodule("skip_correction", correction)
        with segment.graph.inserting_before(add):
            corrected = segment.graph.call_module("skip_correction", (shortcut,))
        add.replace_all_uses_with(corrected)
        segment.graph.erase_node(add)
    else:
        if _feeds_in_place_op(segment, add):
            # the addition made a fresh tensor; without it an in-place activation would overwrite the
            # unit's input (which the full form may still need, as in training)
            with segment.graph.inserting_before(add):
                shortcut = segment.graph.call_method("clone", (shortcut,))
        add.replace_all_uses_with(shortcut)
        segment.graph.erase_node(add)
    segment.graph.eliminate_dead_code()
    segment.graph.lint()
    segment.recompile()
    return segment


def _feeds_in_place_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether any user of ``node`` may write into it (``inplace=True`` modules or calls, ``x.op_()``)."""
    for user in node.users:
        if user.op == "call_module" and getattr(gm.get_submodule(str(user.target)), "inplace", False):
            return True
        if user.op == "call_function" and user.kwargs.get("inplace", False):
            return True
        if user.op == "call_method" and str(user.target).endswith("_"):
            return True
    return False


def full_form(gm: fx.GraphModule, unit: Unit) -> fx.GraphModule:
    """The unit as it is in the network."""
    return extract_segment(gm, unit.start, unit.end)
