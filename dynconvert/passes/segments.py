"""Cut a traced network into consecutive segments that hand one tensor to the next."""

from __future__ import annotations

from torch import fx

from dynconvert.passes.exits import EXIT_PREFIX


def _is_inserted(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith("dyn.")


def extract_segment(gm: fx.GraphModule, start: str | None, end: str | None) -> fx.GraphModule:
    """The part of ``gm`` after node ``start`` up to node ``end`` as a GraphModule of one input.

    ``start=None`` begins at the graph's input; ``end=None`` runs to the network's output (the
    first element of the output when exit heads were inserted). Inserted modules are left out.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    begin = [n.name for n in nodes].index(start) + 1 if start else 0
    if start:
        env[nodes[begin - 1]] = graph.placeholder("x")
    for i, n in enumerate(nodes):
        if _is_inserted(n) or (i < begin and n.op != "get_attr"):
            continue
        if n.op == "output":
            result = n.args[0]
            if isinstance(result, tuple) and any(isinstance(a, fx.Node) and _is_inserted(a) for a in result[1:]):
                result = result[0]
            graph.output(fx.map_arg(result, lambda a: _lookup(env, a)))
            break
        env[n] = graph.node_copy(n, lambda a: _lookup(env, a))
        if end is not None and n.name == end:
            graph.output(env[n])
            break
    segment = fx.GraphModule(gm, graph, class_name="Segment")
    segment.graph.eliminate_dead_code()
    segment.graph.lint()
    segment.recompile()
    return segment


def _lookup(env: dict[fx.Node, fx.Node], node: fx.Node) -> fx.Node:
    if node not in env:
        raise ValueError(f"segment needs value '{node.name}' from before its start: the cut is not a single tensor")
    return env[node]


def split_at(gm: fx.GraphModule, cut_nodes: list[str]) -> list[fx.GraphModule]:
    """Split ``gm`` at each of ``cut_nodes`` (in graph order): ``len(cut_nodes) + 1`` segments."""
    bounds = [None, *cut_nodes, None]
    return [extract_segment(gm, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


__all__ = ["EXIT_PREFIX", "extract_segment", "split_at"]
