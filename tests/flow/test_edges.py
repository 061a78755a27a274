"""Every edge of an unpruned flow graph, forward and backward, against its weight and colour in
docs/flow_graphs.md (the rule tables of tl_backward/flow/rules.py). The formulas' inputs come from
an independent run of the model: ``run_with_cache`` for forward graphs, ``capture`` of the same loss
for backward ones. Biases are filled (the fixtures' are zero) so that the bias edges are drawn, and
the layer's W_O is scaled up so that memory-value edges are not all at VISIT's 0.51 floor."""

import pytest
import torch

from tests.conftest import build
from tests.flow.conftest import LAYER, P, TARGET, TOKENS, hf_modules, metric_at
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.flow import flow_graph
from tl_backward.flow.colors import LN_COLOR, SKIP_MID, SKIP_PRE, attention_color, entropy_grey, sign_color
from tl_backward.flow.rules import (ATTENTION_EDGE_SCALE, FIXED_EDGE_WEIGHT, HEAD_EDGE_SCALE, MIN_ATTENTION_EDGE_WEIGHT,
                                    MLP_ACTIVATION_EDGE_SCALE, QUERY_EDGE_SCALE, VALUE_EDGE_SCALE)

ALL = dict(n_heads=-1, n_memory=-1, n_top_neurons=-1)
# ‖v W_O[j]‖ is ~0.05 in the fixtures, so 1.3·a·‖v W_O[j]‖ < 0.51 for every memory; ×100 lifts
# some memory-value edges above the floor (all of NeoX's).
W_O_SCALE = 100.0
HOOKS = ("resid_pre", "attn_in", "q", "v", "pattern", "attn_scores", "z", "attn_out", "mlp_post", "mlp_out",
         "resid_post")
L = f"L{LAYER}"
# skeleton node id -> the hook of the activation (forward) / full gradient (backward) it carries
SKELETON = {f"resid{LAYER}": "resid_pre", f"{L}.resid_mid": "attn_out", f"{L}.attn_out": "attn_out",
            f"{L}.mlp_out": "mlp_out", f"resid{LAYER + 1}": "resid_post"}


@pytest.fixture(scope="module")
def biased(family):
    """A fresh fixture model of ``family`` with every bias parameter filled and W_O of LAYER scaled."""
    model = build(family)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, prm in model.original_model.named_parameters():
            if name.endswith("bias"):
                prm.copy_(0.1 * torch.randn(prm.shape, generator=gen))
        hf_modules(model.original_model, family, LAYER)["o"][0].weight.mul_(W_O_SCALE)
    return model


def _names(ad, backward):
    names = {k: ad.hook_name(k, LAYER) for k in HOOKS}
    if not ad.parallel_blocks:
        names["resid_mid"] = ad.hook_name("resid_mid", LAYER)
    if backward:
        names["mlp_pre"] = ad.hook_name("mlp_pre_linear" if ad.gated_mlp else "mlp_pre", LAYER)
        names["ln1_in"], names["ln2_in"] = f"blocks.{LAYER}.ln1.hook_in", f"blocks.{LAYER}.ln2.hook_in"
    return names


def _weights(ad):
    kv = torch.tensor([ad.kv_head(j) for j in range(ad.n_heads)])
    return dict(W_Q=ad.W_Q(LAYER), W_K=ad.W_K(LAYER)[kv], W_O=ad.W_O(LAYER), W_out=ad.W_out(LAYER), kv=kv,
                b_in=ad.b_in(LAYER), b_O=ad.b_O(LAYER), b_out=ad.b_out(LAYER))


def _fixed_colour(g, e):
    """The colour every edge of this kind has whatever the direction (None: no colour rule here)."""
    if e.kind == "ln":
        return LN_COLOR
    if e.kind == "skip":
        return SKIP_MID if e.source == f"{L}.resid_mid" else SKIP_PRE
    if e.kind in ("residual", "mlp_value_out"):
        return entropy_grey(g.node(e.source).entropy)
    if e.kind == "mlp_key_in":
        return entropy_grey(g.node(e.target).entropy)
    return None


def _check(g, expect):
    """Compare every edge with ``expect(edge) -> (weight, colour or None)``, grouped by kind."""
    actual, wanted = {}, {}
    for e in g.edges:
        weight, colour = expect(e)
        colour = colour or _fixed_colour(g, e)
        if colour is not None:
            assert e.color == colour, (e.source, e.target, e.kind)
        actual.setdefault(e.kind, []).append(e.weight)
        wanted.setdefault(e.kind, []).append(weight)
    for kind in actual:
        assert_close_fp32(torch.tensor(actual[kind]), torch.tensor(wanted[kind]), n_terms=MODEL_TERMS, what=kind)
    return set(actual)


def _bias_vector(w, node_id, forward, grad_at_p=None):
    key = node_id.split(".")[-1]
    if forward:
        return {"b_O": w["b_O"], "mlp_b_in": w["b_in"] @ w["W_out"], "mlp_b_out": w["b_out"]}[key]
    return {"b_O": grad_at_p("attn_out"), "mlp_b_in": grad_at_p("mlp_pre") @ w["W_out"],
            "mlp_b_out": grad_at_p("mlp_out")}[key]


def test_forward_edges_follow_the_rule_table(biased):
    ad = get_adapter(biased)
    names = _names(ad, backward=False)
    g = flow_graph(biased, TOKENS, layer=LAYER, target=TARGET, **ALL)
    with torch.no_grad():
        _, cache = biased.run_with_cache(TOKENS, names_filter=list(names.values()))
    act = {k: cache[n][0].float() for k, n in names.items()}
    w = _weights(ad)
    z, h, a = act["z"][P], act["mlp_post"][P], act["pattern"][:, P]
    skeleton = dict(SKELETON, **{f"{L}.resid_mid": "resid_mid"})  # forward: resid_mid's own activation
    wo_score = z.reshape(-1) * w["W_O"].reshape(-1, ad.d_model).norm(dim=-1)

    def expect(e):
        src, dst = g.node(e.source), g.node(e.target)
        if e.kind in ("ln", "skip", "residual"):  # ‖input‖
            return float(act[skeleton[e.source]][P].norm()), None
        if e.kind == "qkv":
            return float(act["attn_in"][P].norm()), None
        if e.kind == "query":
            return QUERY_EDGE_SCALE * float((w["W_K"][dst.head] @ act["q"][P, dst.head]).norm()), None
        if e.kind in ("attention_key", "attention_value"):
            prob = float(a[dst.head, dst.position])
            return max(ATTENTION_EDGE_SCALE * prob, MIN_ATTENTION_EDGE_WEIGHT), attention_color(prob)
        if e.kind == "head":
            j, i = src.head, src.position
            value = act["v"][i, w["kv"][j]] @ w["W_O"][j]
            return max(VALUE_EDGE_SCALE * float(a[j, i]) * float(value.norm()), MIN_ATTENTION_EDGE_WEIGHT), None
        if e.kind == "concat":
            return HEAD_EDGE_SCALE * float((z[src.head] @ w["W_O"][src.head]).norm()), None
        if e.kind == "neuron_in":
            return FIXED_EDGE_WEIGHT, sign_color(float(wo_score[dst.neuron]) > 0)
        if e.kind == "neuron_out":
            return abs(float(wo_score[src.neuron])), None
        if e.kind == "mlp_act":
            return MLP_ACTIVATION_EDGE_SCALE * abs(float(h[src.neuron])), sign_color(float(h[src.neuron]) > 0)
        if e.kind == "mlp_value_out":
            return abs(float(h[src.neuron] * w["W_out"][src.neuron].norm())), None
        if e.kind in ("mlp_key_in", "bias_in"):
            return FIXED_EDGE_WEIGHT, None
        assert e.kind == "bias_out", e.kind
        return float(_bias_vector(w, e.source, True).norm()), None

    kinds = _check(g, expect)
    assert ("bias_out" in kinds) == bool(ad.b_out(LAYER).abs().sum() > 0)
    assert {"ln", "skip", "residual", "qkv", "query", "attention_key", "attention_value", "head", "concat",
            "neuron_in", "neuron_out", "mlp_key_in", "mlp_act", "mlp_value_out"} <= kinds
    assert any(e.weight > MIN_ATTENTION_EDGE_WEIGHT for e in g.edges if e.kind == "head"), \
        "every memory-value edge is at the floor: 1.3·a·‖v W_O[j]‖ would go untested"


def test_backward_edges_follow_the_rule_table(biased):
    ad = get_adapter(biased)
    names = _names(ad, backward=True)
    g = flow_graph(biased, TOKENS, layer=LAYER, target=TARGET, backward=True, **ALL)
    cache = capture(biased, TOKENS, metric_at(P, TARGET), names=list(names.values()))
    act = {k: cache.activations[n][0].float() for k, n in names.items()}
    grad = {k: cache.gradients[n][0].float() for k, n in names.items()}
    w = _weights(ad)
    ra = grad["attn_scores"][:, P, : P + 1] / ad.attn_scale(LAYER)  # Reversed Attention at query p
    z, g_z = act["z"][P].reshape(-1), grad["z"][P]
    flow_wo = -z * g_z.reshape(-1)                         # −act · ∂L/∂act
    flow_mlp = -act["mlp_post"][P] * grad["mlp_post"][P]

    def expect(e):
        src, dst = g.node(e.source), g.node(e.target)
        if e.kind == "ln":  # the LN-branch gradient
            return float(grad["ln1_in" if dst.kind == "attn_in" else "ln2_in"][P].norm()), None
        if e.kind in ("skip", "residual"):  # ‖g‖ of the node fed
            return float(grad[SKELETON[e.target]][P].norm()), None
        if e.kind in ("qkv", "head"):  # ‖qkv_j‖, ‖memory value‖
            return float(dst.vector.norm() if e.kind == "qkv" else src.vector.norm()), None
        if e.kind == "query":
            return float((w["W_Q"][dst.head] @ grad["q"][P, dst.head]).norm()), None
        if e.kind == "attention_key":
            r = float(ra[dst.head, dst.position])
            scaled = ATTENTION_EDGE_SCALE * abs(r) / float(ra.abs().max())
            return max(scaled, MIN_ATTENTION_EDGE_WEIGHT), sign_color(-r > 0)
        if e.kind == "attention_value":
            prob = float(act["pattern"][dst.head, P, dst.position])
            return max(ATTENTION_EDGE_SCALE * prob, MIN_ATTENTION_EDGE_WEIGHT), attention_color(prob)
        if e.kind == "concat":
            return float((g_z[src.head] @ w["W_O"][src.head]).norm()), None
        if e.kind in ("neuron_in", "mlp_key_in", "bias_in"):
            colour = sign_color(float(flow_wo[dst.neuron]) > 0) if e.kind == "neuron_in" else None
            return FIXED_EDGE_WEIGHT, colour
        if e.kind == "neuron_out":
            return abs(float(flow_wo[src.neuron])), None
        if e.kind in ("mlp_act", "mlp_value_out"):
            colour = sign_color(float(flow_mlp[src.neuron]) > 0) if e.kind == "mlp_act" else None
            return abs(float(flow_mlp[src.neuron])), colour
        assert e.kind == "bias_out", e.kind
        return float(_bias_vector(w, e.source, False, lambda k: grad[k][P]).norm()), None

    kinds = _check(g, expect)
    assert ("bias_out" in kinds) == bool(ad.b_out(LAYER).abs().sum() > 0)
    assert {"ln", "skip", "residual", "qkv", "query", "attention_key", "attention_value", "head", "concat",
            "neuron_in", "neuron_out", "mlp_key_in", "mlp_act", "mlp_value_out"} <= kinds
