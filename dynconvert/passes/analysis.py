"""Read-only graph analyses: where a network can be cut into consecutive segments."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx


@dataclass
class CutPoint:
    """A node after which exactly one tensor is alive: the network can stop or branch here.

    Attributes:
        node: the fx node's name.
        modules: names of the modules whose computation ends at this node, innermost first
            (``["layer1.2", "layer1"]``); a recipe may pick a point by any of them.
        shape: the per-sample shape of the tensor at this point.
        flops_before: FLOPs per sample of everything up to and including this node.
        flops_fraction: ``flops_before`` over the whole network's FLOPs.
    """

    node: str
    modules: list[str]
    shape: tuple[int, ...]
    flops_before: float = 0.0
    flops_fraction: float = 0.0

    @property
    def name(self) -> str:
        return self.modules[0] if self.modules else self.node


def _scopes(node: fx.Node) -> list[str]:
    """Module paths enclosing ``node``, outermost first, excluding a called leaf module itself."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return paths


def single_live_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Nodes after which the only value still needed later is the node's own output."""
    nodes = [n for n in graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users if u in index), default=index[n]) for n in nodes}
    ends_at: dict[int, list[fx.Node]] = {}
    for n in nodes:
        ends_at.setdefault(last_use[n], []).append(n)
    live: set[fx.Node] = set()
    result = []
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if last_use[n] > i:
            live.add(n)
        for done in ends_at.get(i, []):
            live.discard(done)
        if live == {n}:
            result.append(n)
    return result


def find_cut_points(
    gm: fx.GraphModule, flops_per_node: dict[str, float] | None = None, keep_last: bool = False
) -> list[CutPoint]:
    """Cut points of a shape-propagated graph that end a named module (a block or a stage).

    Points with no batch dimension are dropped, and so are points at the very end (the
    classifier's input, no place for an exit) unless ``keep_last``.
    """
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]
    position = {n: i for i, n in enumerate(nodes)}
    flops_per_node = flops_per_node or {}
    total = sum(flops_per_node.values()) or 1.0
    cumulative, running = {}, 0.0
    for n in nodes:
        running += flops_per_node.get(n.name, 0.0)
        cumulative[n] = running
    points = []
    for n in single_live_nodes(gm.graph):
        meta = n.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape") or len(meta.shape) not in (3, 4):
            continue
        following = nodes[position[n] + 1]
        next_scopes = set(_scopes(following))
        ending = [s for s in reversed(_scopes(n)) if s not in next_scopes]
        if n.op == "call_module" and not ending and not next_scopes.intersection([n.target]):
            ending = []
        if not ending:
            continue
        points.append(
            CutPoint(
                node=n.name,
                modules=ending,
                shape=tuple(meta.shape[1:]),
                flops_before=cumulative[n],
                flops_fraction=cumulative[n] / total,
            )
        )
    return points if keep_last else [p for p in points if p.flops_fraction < 0.999]


def is_channels_last(shape: tuple[int, ...]) -> bool:
    """Whether a per-sample feature of 3 dimensions is laid out (H, W, C), as timm's Swin and
    other NHWC models hand it between stages: square in its first two dimensions, not its last two."""
    return len(shape) == 3 and shape[0] == shape[1] and shape[1] != shape[2]
