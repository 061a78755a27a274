"""VISIT flow-graph data: plain frozen dataclasses (no model code, no rendering).

A :class:`FlowGraph` is what :func:`tl_backward.flow_graph` returns: the nodes and edges of one
(or several chained) transformer block(s) at one position, each node labelled by its logit-lens
projection. It exports to JSON, to networkx, and to a self-contained HTML page
(:meth:`FlowGraph.render` / :meth:`FlowGraph.save`, drawn by :mod:`tl_backward.flow.render`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Union

from torch import Tensor

from tl_backward.errors import TLBackwardError

from .render import graph_figure

# Node kinds, in VISIT's left-to-right order. "resid" covers block_in / resid_mid / block_out.
NODE_KINDS = (
    "resid", "attn_in", "qkv", "query", "key", "value", "head", "concat", "wo_neuron", "bias",
    "attn_out", "mlp_in", "mlp_key", "mlp_value", "mlp_out",
)
# Edge kinds. Weights of edges in the same *group* share units (the renderer scales per group).
EDGE_GROUPS = {
    "ln": "flow", "skip": "flow", "residual": "flow", "qkv": "flow", "query": "flow", "head": "flow",
    "concat": "flow", "neuron_out": "flow", "bias_out": "flow", "mlp_value_out": "flow",
    "attention_key": "attention", "attention_value": "attention",
    "mlp_act": "activation",
    "neuron_in": "fixed", "bias_in": "fixed", "mlp_key_in": "fixed",
}


@dataclass(frozen=True)
class Node:
    """One graph node.

    ``value`` is the signed score the node was ranked by (see the builder's docstring); ``label``
    the displayed token (top-1, bottom-1 for negative-score neurons and for every backward node).
    ``top``/``bottom`` hold ``(token, probability)`` pairs of the logit-lens distribution LL(vector)
    (empty for unprojected nodes such as ``concat``). ``target_rank`` is 1-based
    (1 + #tokens more probable); ``target_bottom_rank`` counts from the least probable (1 = last).
    ``entropy`` is in bits. ``vector`` is the d_model vector that was projected (not in JSON).
    """

    id: str
    kind: str
    layer: int
    label: str
    value: float
    norm: float
    name: str = ""
    head: int | None = None
    neuron: int | None = None
    position: int | None = None
    top: tuple[tuple[str, float], ...] = ()
    bottom: tuple[tuple[str, float], ...] = ()
    target_prob: float | None = None
    target_rank: int | None = None
    target_bottom_rank: int | None = None
    entropy: float | None = None
    color: str = "white"
    title: str = ""
    vector: Tensor | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return f"Node({self.id!r}, {self.kind}, layer {self.layer}, label {self.label!r:.30}, value {self.value:.4g})"

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "vector"}
        out["top"] = [list(t) for t in self.top]
        out["bottom"] = [list(t) for t in self.bottom]
        return out


@dataclass(frozen=True)
class Edge:
    """A directed edge ``source -> target`` (forward direction, also in backward graphs).

    ``weight`` is the edge's quantity as defined in the builder's docstring (≥ 0); ``kind`` one of
    :data:`EDGE_GROUPS`; ``color`` its CSS colour (sign, attention or entropy grey).
    """

    source: str
    target: str
    kind: str
    weight: float
    color: str = "#9aa7b4"

    @property
    def group(self) -> str:
        return EDGE_GROUPS[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FlowGraph:
    """A VISIT flow graph of ``layers`` at token ``position`` (forward or backward).

    ``target``/``target_token``: the token whose probability/rank colours the nodes.
    ``tokens``: the prompt's token strings. ``backward``: nodes carry gradients, edges gradient
    flow. ``metric``: the loss value of a backward graph (None for forward graphs).
    ``d_vocab``: vocabulary size (colour scale). ``notes``: approximations in force (gated MLPs).
    """

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    layers: tuple[int, ...]
    position: int
    tokens: tuple[str, ...]
    target: int
    target_token: str
    backward: bool
    d_vocab: int
    parallel: bool = False
    metric: float | None = None
    notes: tuple[str, ...] = ()

    # --------------------------------------------------------------------------------- access
    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no node {node_id!r}; ids look like {[n.id for n in self.nodes[:4]]}")

    def nodes_of(self, kind: str) -> list[Node]:
        if kind not in NODE_KINDS:
            raise TLBackwardError(f"kind must be one of {NODE_KINDS}, got {kind!r}", argument="kind")
        return [n for n in self.nodes if n.kind == kind]

    def edges_into(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.target == node_id]

    def edges_from(self, node_id: str) -> list[Edge]:
        return [e for e in self.edges if e.source == node_id]

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        kind = "backward" if self.backward else "forward"
        layers = ",".join(map(str, self.layers))
        return (f"FlowGraph({kind}, layers={layers}, position={self.position}, "
                f"target={self.target_token!r}, {len(self.nodes)} nodes, {len(self.edges)} edges)")

    # --------------------------------------------------------------------------------- export
    def to_dict(self) -> dict[str, Any]:
        meta = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("nodes", "edges")}
        meta["layers"], meta["tokens"], meta["notes"] = list(self.layers), list(self.tokens), list(self.notes)
        return {**meta, "nodes": [n.to_dict() for n in self.nodes], "edges": [e.to_dict() for e in self.edges]}

    def to_json(self, path: Union[str, Path, None] = None, **kwargs: Any) -> str:
        """The graph as JSON (no tensors); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def to_networkx(self):
        """A ``networkx.DiGraph`` with the node and edge fields as attributes (needs networkx)."""
        try:
            import networkx as nx
        except ImportError as err:
            raise ImportError("to_networkx() needs networkx: pip install networkx") from err
        g = nx.DiGraph(layers=list(self.layers), position=self.position, target=self.target_token,
                       backward=self.backward)
        for n in self.nodes:
            g.add_node(n.id, **{k: v for k, v in n.to_dict().items() if k != "id"})
        for e in self.edges:
            g.add_edge(e.source, e.target, kind=e.kind, weight=e.weight, color=e.color)
        return g

    # --------------------------------------------------------------------------------- render
    def render(self, *, title: str | None = None):
        """A :class:`~tl_backward.render.page.Figure` (inline SVG + a little plain JS)."""
        return graph_figure(self, title=title)

    def save(self, path: Union[str, Path], *, title: str | None = None) -> Path:
        """Write a standalone offline HTML page and return its Path."""
        return self.render(title=title).save(path)

    def _repr_html_(self) -> str:
        return self.render()._repr_html_()


def merge(graphs: Iterable[FlowGraph]) -> FlowGraph:
    """Chain graphs of consecutive layers (same prompt, position, target and direction) into one;
    a block's output node is the next block's input node (shared id)."""
    graphs = sorted(graphs, key=lambda g: g.layers[0])
    if not graphs:
        raise TLBackwardError("merge() needs at least one graph in graphs", argument="graphs")
    first = graphs[0]
    for g in graphs[1:]:
        same = (g.position, g.tokens, g.target, g.backward) == (first.position, first.tokens, first.target, first.backward)
        if not same:
            raise TLBackwardError("merge(): the graphs differ in prompt, position, target or direction",
                                  argument="graphs")
    nodes: dict[str, Node] = {}
    for g in graphs:
        for n in g.nodes:
            nodes.setdefault(n.id, n)
    edges = {(e.source, e.target, e.kind): e for g in graphs for e in g.edges}
    layers = tuple(l for g in graphs for l in g.layers)
    if len(set(layers)) != len(layers):
        raise TLBackwardError(f"merge(): the graphs' layers overlap: {layers}", argument="graphs")
    notes = tuple(dict.fromkeys(n for g in graphs for n in g.notes))
    return FlowGraph(nodes=tuple(nodes.values()), edges=tuple(edges.values()), layers=layers,
                     position=first.position, tokens=first.tokens, target=first.target,
                     target_token=first.target_token, backward=first.backward, d_vocab=first.d_vocab,
                     parallel=first.parallel, metric=first.metric, notes=notes)
