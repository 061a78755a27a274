"""The topology of one VISIT layer (Katz & Belinkov 2023, VISIT), shared by forward and backward
graphs: which nodes and edges exist, their ids, kinds and names, and how they connect. The numbers
on them come from a rule table (:class:`~tl_backward.flow.rules.ForwardRules` or
:class:`~tl_backward.flow.rules.BackwardRules`); the pruning keeps the top-scoring heads, memories
and neurons by that table's scores. Definitions and edge weights: docs/flow_graphs.md.

One layer, left to right::

    block_in ─ln1→ attn_in → qkv_j → q_j → memory key k_{j,i} → memory value v_{j,i} → A_j → concat
    concat → W_O row r / b_O → attn_out ─residual→ resid_mid ─ln2→ mlp_in → MLP key K_i → value V_i
    V_i / MLP biases → mlp_out ─residual→ block_out;   skips block_in → resid_mid → block_out

Parallel blocks (NeoX) have no resid_mid: both LN steps leave block_in, attn_out lands on block_out
and one skip runs block_in → block_out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tl_backward.core.adapter import ModelAdapter

from . import vectors as V
from .colors import LN_COLOR, SKIP_MID, SKIP_PRE
from .rules import BackwardRules, ForwardRules, NodeRule, Rules, gather_layer
from .specs import EdgeSpec, LayerData, NodeSpec, norm_of

# Skeleton nodes in drawing order: (name, kind, hook of the activation or gradient it carries).
SKELETON_NODES = (("block_in", "resid", "resid_pre"), ("attn_in", "attn_in", "attn_in"),
                  ("attn_out", "attn_out", "attn_out"), ("resid_mid", "resid", "resid_mid"),
                  ("mlp_in", "mlp_in", "mlp_in"), ("mlp_out", "mlp_out", "mlp_out"),
                  ("block_out", "resid", "resid_post"))

# Skeleton edges: (source, target, kind, weight role in the rule table, fixed colour, entropy-grey node).
SEQUENTIAL_SKELETON_EDGES = (
    ("block_in", "attn_in", "ln", "ln1", LN_COLOR, None),
    ("attn_out", "resid_mid", "residual", "attn_residual", None, "attn_out"),
    ("block_in", "resid_mid", "skip", "skip_pre", SKIP_PRE, None),
    ("resid_mid", "mlp_in", "ln", "ln2", LN_COLOR, None),
    ("mlp_out", "block_out", "residual", "mlp_residual", None, "mlp_out"),
    ("resid_mid", "block_out", "skip", "skip_mid", SKIP_MID, None),
)
PARALLEL_SKELETON_EDGES = (
    ("block_in", "attn_in", "ln", "ln1", LN_COLOR, None),
    ("attn_out", "block_out", "residual", "attn_residual", None, "attn_out"),
    ("block_in", "block_out", "skip", "skip_pre", SKIP_PRE, None),
    ("block_in", "mlp_in", "ln", "ln2", LN_COLOR, None),
    ("mlp_out", "block_out", "residual", "mlp_residual", None, "mlp_out"),
)

Specs = tuple[list[NodeSpec], list[EdgeSpec]]
NO_INDICES = torch.zeros(0, dtype=torch.long)


def layer_specs(ad: ModelAdapter, data: LayerData, layer: int, p: int, opts: dict[str, Any], backward: bool,
                tokens: list[str], rotary: tuple[Tensor, Tensor] | tuple[None, None]) -> Specs:
    """Nodes and edges of one block at position p (see docs/flow_graphs.md for the definitions).

    ``opts``: n_heads, n_memory, n_top, n_bottom (pruning; −1 keeps all), bias (draw bias nodes) and
    optionally ``like``, a selection {("heads", L) | ("memory", L, j) | ("wo", L) | ("mlp", L): indices}
    that replaces the pruning. ``tokens`` are the prompt's string tokens; ``rotary`` the cos/sin of
    RoPE models.
    """
    tensors = gather_layer(ad, data, layer, p, rotary)
    rules = (BackwardRules if backward else ForwardRules)(tensors)
    nodes, edges = _skeleton(rules)
    for part_nodes, part_edges in (_attention(rules, opts, tokens), _wo_neurons(rules, opts),
                                   _mlp_neurons(rules, opts)):
        nodes += part_nodes
        edges += part_edges
    return nodes, edges


def _like(opts: dict[str, Any], key: tuple) -> Tensor | None:
    """The indices another graph kept for ``key`` when ``opts["like"]`` reuses its selection (the
    same nodes, e.g. forward vs backward), else None."""
    like = opts.get("like")
    return None if like is None else like.get(key, NO_INDICES)


def _top_kept(opts: dict[str, Any], key: tuple, scores: Tensor, count: str) -> Tensor:
    """Indices of the ``opts[count]`` largest scores (or the ``like`` selection)."""
    kept = _like(opts, key)
    return V.top_selection(scores, opts[count]) if kept is None else kept


def _signed_kept(opts: dict[str, Any], key: tuple, scores: Tensor) -> Tensor:
    """Indices of the n_top largest and n_bottom smallest signed scores (or the ``like`` selection)."""
    kept = _like(opts, key)
    return V.signed_selection(scores, opts["n_top"], opts["n_bottom"]) if kept is None else kept


def _skeleton(rules: Rules) -> Specs:
    """The residual-stream nodes and the LN, residual and skip edges between them."""
    ids, parallel = rules.ids, rules.tensors.parallel_blocks
    nodes = []
    for name, kind, hook in SKELETON_NODES:
        if name == "resid_mid" and parallel:
            continue
        rule = rules.skeleton_node(name, hook)
        nodes.append(NodeSpec(ids.node(name), kind, ids.layer, name, rule.vector, norm_of(rule.vector),
                              share=rule.share))
    table = PARALLEL_SKELETON_EDGES if parallel else SEQUENTIAL_SKELETON_EDGES
    edges = [EdgeSpec(ids.node(src), ids.node(dst), kind, rules.skeleton_edge(role), color,
                      entropy_of=None if grey is None else ids.node(grey))
             for src, dst, kind, role, color, grey in table]
    return nodes, edges


def _attention(rules: Rules, opts: dict[str, Any], tokens: list[str]) -> Specs:
    """Per kept head: qkv, query, kept memory keys/values and head output; then concat."""
    ids, layer, p = rules.ids, rules.ids.layer, rules.p
    nodes: list[NodeSpec] = []
    edges: list[EdgeSpec] = []
    for j in _top_kept(opts, ("heads", layer), rules.head_scores, "n_heads").tolist():
        hj, score = ids.head(j), float(rules.head_scores[j])
        qkv, query = rules.qkv_node(j), rules.query_node(j)
        nodes.append(NodeSpec(f"{hj}.qkv", "qkv", layer, "qkv", qkv.vector, score, head=j, position=p,
                              extra=list(qkv.extra), share=qkv.share))
        nodes.append(NodeSpec(f"{hj}.q", "query", layer, "q", query.vector, score, head=j, position=p,
                              share=query.share))
        edges.append(EdgeSpec(ids.node("attn_in"), f"{hj}.qkv", "qkv", rules.qkv_edge(j)))
        edges.append(EdgeSpec(f"{hj}.qkv", f"{hj}.q", "query", rules.query_edge(j)))
        memories = _top_kept(opts, ("memory", layer, j), rules.memory_scores[j], "n_memory")
        for i in memories.tolist():
            _memory(rules, j, i, tokens[i], nodes, edges)
        head = rules.head_output_node(j)
        nodes.append(NodeSpec(f"{hj}.A", "head", layer, "head output", head.vector, score, head=j,
                              share=head.share))
        edges.append(EdgeSpec(f"{hj}.A", ids.node("concat"), "concat", rules.head_edge(j)))
    nodes.append(NodeSpec(ids.node("concat"), "concat", layer, "concat", None, rules.concat_value()))
    return nodes, edges


def _memory(rules: Rules, j: int, i: int, token: str, nodes: list[NodeSpec], edges: list[EdgeSpec]) -> None:
    """Memory (head j, key position i): q_j → key → value → A_j."""
    layer, hj = rules.ids.layer, rules.ids.head(j)
    key, value = rules.memory_key_node(j, i), rules.memory_value_node(j, i)
    score = float(rules.memory_scores[j, i])
    origin = f"created from {token!r} (position {i})"
    nodes.append(NodeSpec(f"{hj}.k{i}", "key", layer, "memory key", key.vector, score, head=j, position=i,
                          note=f"{origin}; {key.note}", share=key.share))
    nodes.append(NodeSpec(f"{hj}.v{i}", "value", layer, "memory value", value.vector, score, head=j, position=i,
                          note=f"{origin}; {value.note}", share=value.share))
    edges.append(EdgeSpec(f"{hj}.q", f"{hj}.k{i}", "attention_key", *rules.attention_key_edge(j, i)))
    edges.append(EdgeSpec(f"{hj}.k{i}", f"{hj}.v{i}", "attention_value", *rules.attention_value_edge(j, i)))
    edges.append(EdgeSpec(f"{hj}.v{i}", f"{hj}.A", "head", rules.value_to_head_edge(j, i, value.vector)))


def _wo_neurons(rules: Rules, opts: dict[str, Any]) -> Specs:
    """W_O neurons (rows of W_O as [h·e, d]) and the b_O node, between concat and attn_out."""
    tensors, ids, layer = rules.tensors, rules.ids, rules.ids.layer
    concat, attn_out = ids.node("concat"), ids.node("attn_out")
    nodes: list[NodeSpec] = []
    edges: list[EdgeSpec] = []
    for r in _signed_kept(opts, ("wo", layer), rules.wo_scores).tolist():
        score = float(rules.wo_scores[r])
        head, dim = divmod(r, tensors.d_head)
        row, nid = rules.wo_row_node(r), f"{ids.prefix}.O{r}"
        nodes.append(NodeSpec(nid, "wo_neuron", layer, f"W_O row {r} (head {head}, dim {dim})", row.vector, score,
                              head=head, neuron=r, negative=score < 0 and rules.negative_from_bottom, note=row.note,
                              share=row.share))
        edges.append(EdgeSpec(concat, nid, "neuron_in", *rules.wo_row_in_edge(r)))
        edges.append(EdgeSpec(nid, attn_out, "neuron_out", rules.wo_row_out_edge(r)))
    if opts["bias"] and bool(tensors.b_O.abs().sum() > 0):
        _bias(rules, "b_O", "b_O", rules.attn_bias_node(), concat, attn_out, nodes, edges)
    return nodes, edges


def _mlp_neurons(rules: Rules, opts: dict[str, Any]) -> Specs:
    """MLP key-value memories (key W_in[:, i], value W_out[i] forward) and the MLP bias nodes."""
    tensors, ids, layer = rules.tensors, rules.ids, rules.ids.layer
    mlp_in, mlp_out = ids.node("mlp_in"), ids.node("mlp_out")
    nodes: list[NodeSpec] = []
    edges: list[EdgeSpec] = []
    for i in _signed_kept(opts, ("mlp", layer), rules.mlp_scores).tolist():
        score = float(rules.mlp_scores[i])
        negative = score < 0 and rules.negative_from_bottom
        key, value = rules.mlp_key_node(i), rules.mlp_value_node(i)
        key_id, value_id = f"{ids.prefix}.K{i}", f"{ids.prefix}.V{i}"
        nodes.append(NodeSpec(key_id, "mlp_key", layer, f"MLP key {i}", key.vector, score, neuron=i,
                              negative=negative, note=key.note, share=key.share))
        nodes.append(NodeSpec(value_id, "mlp_value", layer, f"MLP value {i}", value.vector, score, neuron=i,
                              negative=negative, note=value.note, share=value.share))
        edges.append(EdgeSpec(mlp_in, key_id, "mlp_key_in", rules.mlp_key_in_edge(), entropy_of=key_id))
        edges.append(EdgeSpec(key_id, value_id, "mlp_act", *rules.mlp_activation_edge(i)))
        edges.append(EdgeSpec(value_id, mlp_out, "mlp_value_out", rules.mlp_value_edge(i), entropy_of=value_id))
    if opts["bias"]:
        if bool(tensors.b_in.abs().sum() > 0) and not tensors.gated_mlp:
            _bias(rules, "mlp_b_in", "b_in @ W_out", rules.mlp_in_bias_node(), mlp_in, mlp_out, nodes, edges)
        if bool(tensors.b_out.abs().sum() > 0):
            _bias(rules, "mlp_b_out", "b_out", rules.mlp_out_bias_node(), mlp_in, mlp_out, nodes, edges)
    return nodes, edges


def _bias(rules: Rules, key: str, name: str, rule: NodeRule, source: str, target: str, nodes: list[NodeSpec],
          edges: list[EdgeSpec]) -> None:
    """A bias node ``L{L}.{key}`` between ``source`` and ``target``."""
    nid = f"{rules.ids.prefix}.{key}"
    nodes.append(NodeSpec(nid, "bias", rules.ids.layer, name, rule.vector, norm_of(rule.vector), bias=True,
                          share=rule.share))
    edges.append(EdgeSpec(source, nid, "bias_in", rules.bias_in_edge()))
    edges.append(EdgeSpec(nid, target, "bias_out", rules.bias_out_edge(rule.vector)))
