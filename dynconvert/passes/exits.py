"""The exit-head pass: attach a head to chosen cut points of a traced network."""

from __future__ import annotations

from torch import fx, nn

EXIT_PREFIX = "dyn.exits"


def insert_exit_heads(gm: fx.GraphModule, nodes: list[str], heads: list[nn.Module]) -> fx.GraphModule:
    """Attach ``heads[k]`` to node ``nodes[k]``; the graph then returns ``(logits, exit_0, ...)``.

    The heads become submodules ``dyn.exits.{k}``. Returns ``gm`` changed, linted and
    recompiled. Raises ValueError naming the node when it is not in the graph.
    """
    if len(nodes) != len(heads):
        raise ValueError("one head per exit node")
    by_name = {n.name: n for n in gm.graph.nodes}
    container = nn.ModuleList(heads)
    if not hasattr(gm, "dyn"):
        gm.add_submodule("dyn", nn.Module())
    gm.dyn.add_module("exits", container)
    outputs = []
    for k, name in enumerate(nodes):
        if name not in by_name:
            raise ValueError(f"insert_exit_heads: no node named '{name}' in the graph")
        node = by_name[name]
        with gm.graph.inserting_after(node):
            outputs.append(gm.graph.call_module(f"{EXIT_PREFIX}.{k}", (node,)))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], *outputs),)
    gm.graph.lint()
    gm.recompile()
    return gm


def exit_points_of(gm: fx.GraphModule) -> list[str]:
    """Names of the nodes the exit heads of ``gm`` read, in exit order."""
    found = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target).startswith(EXIT_PREFIX + "."):
            found[int(str(n.target).rsplit(".", 1)[1])] = n.args[0].name
    return [found[k] for k in sorted(found)]
