"""FlowGraph data: defaults, topology per block type, chaining, exports and input errors."""

import json

import pytest
import torch

from tests.conftest import build
from tests.flow.conftest import LAYER, TOKENS
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.flow import FlowGraph, flow_graph, merge


@pytest.fixture(scope="module")
def graphs(model):
    return (flow_graph(model, TOKENS, layer=LAYER), flow_graph(model, TOKENS, layer=LAYER, backward=True))


def test_default_pruning_counts_and_same_topology_both_ways(model, graphs):
    ad = get_adapter(model)
    for g in graphs:
        assert len(g.nodes_of("head")) == min(10, ad.n_heads)
        assert len(g.nodes_of("key")) == len(g.nodes_of("value")) == 2 * min(10, ad.n_heads)
        assert len(g.nodes_of("wo_neuron")) == min(25, ad.n_heads * ad.d_head)
        assert len(g.nodes_of("mlp_key")) == len(g.nodes_of("mlp_value")) == min(25, ad.d_mlp)
        assert len(g.nodes_of("concat")) == 1
        assert len({n.id for n in g.nodes}) == len(g.nodes)
    fwd, bwd = graphs
    assert [n.kind for n in fwd.nodes] == [n.kind for n in bwd.nodes]
    assert [(e.kind) for e in fwd.edges] == [(e.kind) for e in bwd.edges]
    assert fwd.metric is None and bwd.metric > 0


def test_skeleton_topology_sequential_vs_parallel(model, graphs):
    ad = get_adapter(model)
    g = graphs[0]
    pre, post, L = f"resid{LAYER}", f"resid{LAYER + 1}", f"L{LAYER}"
    pairs = {(e.source, e.target, e.kind) for e in g.edges}
    if ad.parallel_blocks:
        assert not any(n.name == "resid_mid" for n in g.nodes)
        assert {(pre, f"{L}.attn_in", "ln"), (pre, f"{L}.mlp_in", "ln"), (pre, post, "skip"),
                (f"{L}.attn_out", post, "residual"), (f"{L}.mlp_out", post, "residual")} <= pairs
    else:
        mid = f"{L}.resid_mid"
        assert {(pre, f"{L}.attn_in", "ln"), (pre, mid, "skip"), (f"{L}.attn_out", mid, "residual"),
                (mid, f"{L}.mlp_in", "ln"), (mid, post, "skip"), (f"{L}.mlp_out", post, "residual")} <= pairs
    assert bool(g.notes) == ad.gated_mlp


def test_chained_layers_share_the_block_boundary(model):
    chain = flow_graph(model, TOKENS, layer=[0, 1])
    g0, g1 = flow_graph(model, TOKENS, layer=0), flow_graph(model, TOKENS, layer=1)
    assert chain.layers == (0, 1)
    assert len(chain.nodes) == len(g0.nodes) + len(g1.nodes) - 1
    assert [n.id for n in chain.nodes_of("resid")].count("resid1") == 1
    assert chain.edges_into("resid1") and chain.edges_from("resid1")
    merged = merge([g1, g0])
    assert {n.id for n in merged.nodes} == {n.id for n in chain.nodes}
    assert_close_fp32(chain.node("resid1").vector, g1.node("resid1").vector, n_terms=MODEL_TERMS)  # two runs
    with pytest.raises(ValueError, match="overlap"):
        merge([g0, g0])


def test_exports(graphs):
    nx = pytest.importorskip("networkx")
    for g in graphs:
        data = json.loads(g.to_json())
        assert len(data["nodes"]) == len(g.nodes) and len(data["edges"]) == len(g.edges)
        assert "vector" not in data["nodes"][0] and data["backward"] == g.backward
        assert data["nodes"][0]["top"][0][0] == g.nodes[0].top[0][0]
        G = g.to_networkx()
        assert isinstance(G, nx.DiGraph)
        assert G.number_of_nodes() == len(g.nodes) and G.number_of_edges() == len(g.edges)
        e = g.edges[0]
        assert G.edges[e.source, e.target]["weight"] == e.weight
        assert "FlowGraph(" in repr(g) and len(g) == len(g.nodes)


def test_forward_leaves_no_trace(model):
    flow_graph(model, TOKENS, layer=0)
    assert_no_hooks(model)
    assert_untouched(model)


def test_clear_errors(gpt2_model):
    m = gpt2_model
    with pytest.raises(ValueError, match="one prompt"):
        flow_graph(m, ["the cat", "the dog"], layer=0)
    with pytest.raises(ValueError, match="position"):
        flow_graph(m, TOKENS, layer=0, position=TOKENS.shape[1])
    with pytest.raises(ValueError, match="out of range"):
        flow_graph(m, TOKENS, layer=5)
    with pytest.raises(TypeError, match="n_heads"):
        flow_graph(m, TOKENS, layer=0, n_heads="3")
    with pytest.raises(ValueError, match="n_memory"):
        flow_graph(m, TOKENS, layer=0, n_memory=-2)
    with pytest.raises(ValueError, match="backward"):
        flow_graph(m, TOKENS, layer=0, metric=lambda lg, t: lg.sum())
    with pytest.raises(ValueError, match="target"):
        flow_graph(m, TOKENS, layer=0, target="  ")
    with pytest.raises(TypeError, match="TransformerBridge"):
        flow_graph(torch.nn.Linear(2, 2), TOKENS, layer=0)
    with pytest.raises(KeyError):
        flow_graph(m, TOKENS, layer=0).node("nope")


def test_refuses_compatibility_mode():
    m = build("gpt2")
    m.enable_compatibility_mode()
    with pytest.raises(ValueError, match="compatibility mode"):
        flow_graph(m, TOKENS, layer=0)


def test_flowgraph_is_frozen(graphs):
    with pytest.raises(Exception):
        graphs[0].nodes = ()
    assert isinstance(graphs[0], FlowGraph)


def test_like_reuses_another_graphs_nodes(model):
    fwd = flow_graph(model, TOKENS, layer=[0, 1], n_heads=2, n_memory=1, n_top_neurons=3, n_bottom_neurons=1)
    bwd = flow_graph(model, TOKENS, layer=[0, 1], backward=True, like=fwd)
    assert [n.id for n in bwd.nodes] == [n.id for n in fwd.nodes]
    assert [(e.source, e.target) for e in bwd.edges] == [(e.source, e.target) for e in fwd.edges]
    from tl_backward.flow.render import layout

    assert layout(bwd) == layout(fwd)                     # identical drawing, side by side
    own = flow_graph(model, TOKENS, layer=1, backward=True)
    one = flow_graph(model, TOKENS, layer=1, backward=True, like=fwd)
    assert {n.id for n in one.nodes} <= {n.id for n in fwd.nodes}
    for n in one.nodes_of("mlp_value"):   # same vectors as the backward graph's own choice would give
        if n.id in {m.id for m in own.nodes}:
            assert_close_fp32(n.vector, own.node(n.id).vector, n_terms=MODEL_TERMS)  # two runs
    with pytest.raises(ValueError, match="like"):
        flow_graph(model, TOKENS, layer=1, like=flow_graph(model, TOKENS, layer=0))
    with pytest.raises(TypeError, match="like"):
        flow_graph(model, TOKENS, layer=1, like="forward")
