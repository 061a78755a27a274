"""Backward flow graphs: every node vector against independent autograd on a fresh plain-HF model,
branch gradients summing to node gradients, and edge weights as documented."""

import pytest
import torch

from tests.conftest import SPECS
from tests.flow.conftest import LAYER, P, TARGET, TOKENS, hf_weight_grads, metric_at, nll_at
from tests.reference import assert_no_hooks, assert_untouched, hf_activation_grads
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.flow import flow_graph
from tl_backward.flow import vectors as V
from tl_backward.flow.build import _gather, _rotary
from tl_backward.flow.colors import PALETTE


def close(a, b, *, n_terms=MODEL_TERMS, scale=None):
    """fp32 agreement; by default for values from a whole forward + backward (TL vs plain HF).
    ``scale``: the size of the family a vector belongs to, when it is a small member of it."""
    assert_close_fp32(a, b, n_terms=n_terms, scale=scale)


@pytest.fixture(scope="module")
def full(model, family):
    """Backward graph with nothing pruned, the HF reference and the forward pattern."""
    g = flow_graph(model, TOKENS, layer=LAYER, target=TARGET, backward=True, n_heads=-1, n_memory=-1,
                   n_top_neurons=-1)
    ref = hf_activation_grads(family, SPECS[family]["seed"], TOKENS, nll_at(P, TARGET), LAYER,
                              SPECS[family]["n_heads"], SPECS[family].get("n_kv_heads"))
    ad = get_adapter(model)
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS, names_filter=[ad.hook_name("pattern", LAYER)])
    pattern = cache[ad.hook_name("pattern", LAYER)][0].float()
    return g, ref, pattern, ad


def test_skeleton_nodes_are_autograd_gradients(full, model):
    g, ref, _, ad = full
    grad = lambda k: ref[k][1][0, P]  # noqa: E731
    close(g.node(f"resid{LAYER}").vector, grad("resid_pre"))
    close(g.node(f"resid{LAYER + 1}").vector, grad("resid_post"))
    close(g.node(f"L{LAYER}.attn_out").vector, grad("attn_out"))
    close(g.node(f"L{LAYER}.mlp_in").vector, grad("mlp_in"))
    close(g.node(f"L{LAYER}.mlp_out").vector, grad("mlp_out"))
    if not ad.parallel_blocks:
        close(g.node(f"L{LAYER}.resid_mid").vector, grad("resid_mid"))
    # attn_in: the sum of what reaches the LN1 output through every q, k and v head
    W_Q, W_K, W_V = ad.W_Q(LAYER), ad.W_K(LAYER), ad.W_V(LAYER)
    expect = (torch.einsum("hde,he->d", W_Q, grad("q")) + torch.einsum("hde,he->d", W_K, grad("k"))
              + torch.einsum("hde,he->d", W_V, grad("v")))
    close(g.node(f"L{LAYER}.attn_in").vector, expect)
    with torch.no_grad():
        loss = float(nll_at(P, TARGET)(model(TOKENS)))
    assert g.backward and g.metric == pytest.approx(loss, rel=fp32_rtol(MODEL_TERMS))  # two forward passes


def test_head_nodes_are_autograd_gradients(full):
    g, ref, pattern, ad = full
    W_Q, W_K, W_O = ad.W_Q(LAYER), ad.W_K(LAYER), ad.W_O(LAYER)
    q_act, g_q = ref["q"][0][0, P], ref["q"][1][0, P]
    g_z = ref["z"][1][0, P]
    v_act = ref["v"][0][0]
    s = ad.attn_scale(LAYER)
    qkv_sum = torch.zeros(ad.d_model)
    for j in range(ad.n_heads):
        kv = ad.kv_head(j)
        close(g.node(f"L{LAYER}.H{j}.q").vector, W_K[kv] @ g_q[j])
        close(g.node(f"L{LAYER}.H{j}.A").vector, g_z[j] @ W_O[j])
        # RA from the softmax backward with reference g_z and v: dL/dscore = P (dL/dP − Σ P dL/dP)
        dP = v_act[: P + 1, kv] @ g_z[j]
        a = pattern[j, P, : P + 1]
        ra = a * (dP - (a * dP).sum()) / s
        # k_i = ra_i·(W_Q q): the error of a small ra_i is set by the softmax-backward terms a·dP/s
        k_scale = float((a * dP).abs().max()) / s * float((W_Q[j] @ q_act[j]).abs().max())
        for i in range(P + 1):
            close(g.node(f"L{LAYER}.H{j}.k{i}").vector, W_Q[j] @ (ra[i] * q_act[j]), scale=k_scale)
            close(g.node(f"L{LAYER}.H{j}.v{i}").vector, (a[i] * g_z[j]) @ W_O[j])
        qkv_sum += g.node(f"L{LAYER}.H{j}.qkv").vector
    # the qkv_j nodes split grad(attn_in) exactly across heads
    close(qkv_sum, g.node(f"L{LAYER}.attn_in").vector)
    # key p is read only by query p (last position): value shares sum to the full value gradient
    for kv in range(ad.n_kv_heads):
        heads = [j for j in range(ad.n_heads) if ad.kv_head(j) == kv]
        close(sum(pattern[j, P, P] * g_z[j] for j in heads), ref["v"][1][0, P, kv])


def test_key_and_value_gradient_shares_at_every_position(model, family):
    """Σ over a kv group of head shares = the autograd key/value gradient, at every position
    (exercises the RoPE frame changes)."""
    ad = get_adapter(model)
    names = [ad.hook_name(k, LAYER) for k in ("q", "z", "pattern", "attn_scores")]
    cache = capture(model, TOKENS, metric_at(P, TARGET), names=names)
    q, gz = cache[names[0]][0], cache.grad(names[1])[0]
    pattern, ra = cache[names[2]][0], cache.grad(names[3])[0] / ad.attn_scale(LAYER)
    cos, sin = _rotary(ad, TOKENS.shape[1])
    ref = hf_activation_grads(family, SPECS[family]["seed"], TOKENS, nll_at(P, TARGET), LAYER,
                              SPECS[family]["n_heads"], SPECS[family].get("n_kv_heads"))
    for p in range(TOKENS.shape[1]):
        gk = V.key_grad_share(ra, q, p, cos, sin)
        gv = V.value_grad_share(pattern, gz, p)
        for kv in range(ad.n_kv_heads):
            heads = [j for j in range(ad.n_heads) if ad.kv_head(j) == kv]
            # scaled by the gradient's size over all positions: some positions get tiny ones
            close(gk[heads].sum(0), ref["k"][1][0, p, kv], scale=float(ref["k"][1][0].abs().max()))
            close(gv[heads].sum(0), ref["v"][1][0, p, kv], scale=float(ref["v"][1][0].abs().max()))


def test_neuron_nodes_are_weight_gradients_at_the_position(full, family):
    g, ref, _, ad = full
    z = ref["z"][0][0, P].reshape(-1)
    g_out = ref["attn_out"][1][0, P]
    # outer products a_i·g: a small a_i is a cancellation, so scale by max|a|·max|g| of the family
    outer = lambda u, w: float(u.abs().max() * w.abs().max())  # noqa: E731
    for n in g.nodes_of("wo_neuron"):
        close(n.vector, z[n.neuron] * g_out, scale=outer(z, g_out))
    pre = "mlp_pre_linear" if ad.gated_mlp else "mlp_pre"
    x, d_pre = ref["mlp_in"][0][0, P], ref[pre][1][0, P]
    h, d_out = ref["mlp_post"][0][0, P], ref["mlp_out"][1][0, P]
    keys, values = g.nodes_of("mlp_key"), g.nodes_of("mlp_value")
    assert len(keys) == len(values) == ad.d_mlp
    for n in keys:
        close(n.vector, d_pre[n.neuron] * x, scale=outer(d_pre, x))
    for n in values:
        close(n.vector, h[n.neuron] * d_out, scale=outer(h, d_out))


def test_position_sums_give_the_autograd_weight_gradients(model, family):
    """Σ_p of the W_O-row / MLP key / MLP value nodes (one loss, graphs at every position) equals
    ∂L/∂W_O, ∂L/∂W_in, ∂L/∂W_out of a fresh HF model."""
    W = hf_weight_grads(family, TOKENS, nll_at(P, TARGET))
    sums = {k: torch.zeros_like(v) for k, v in W.items()}
    for p in range(TOKENS.shape[1]):
        g = flow_graph(model, TOKENS, layer=LAYER, position=p, backward=True, metric=metric_at(P, TARGET),
                       n_heads=1, n_memory=1, n_top_neurons=-1)
        for n in g.nodes_of("wo_neuron"):
            sums["W_O"][n.neuron] += n.vector
        for n in g.nodes_of("mlp_key"):
            sums["W_in"][:, n.neuron] += n.vector
        for n in g.nodes_of("mlp_value"):
            sums["W_out"][n.neuron] += n.vector
    for k in W:
        assert_close_fp32(sums[k], W[k], n_terms=MODEL_TERMS, what=k)  # one run per position vs HF autograd


def test_branch_gradients_sum_to_node_gradients_and_edges_carry_them(model):
    ad = get_adapter(model)
    (d,), _, _ = _gather(ad, TOKENS, [LAYER], P, True, None, TARGET)
    gr = {k: d.grads[k][P] for k in ("resid_pre", "ln1_in", "attn_out", "ln2_in", "resid_post", "mlp_out")}
    g = flow_graph(model, TOKENS, layer=LAYER, target=TARGET, backward=True)
    w = {(e.source, e.target): e.weight for e in g.edges}
    pre, post = f"resid{LAYER}", f"resid{LAYER + 1}"
    L = f"L{LAYER}"
    # autograd adds ≤ 3 branch gradients; edge weights come from another run of the model
    rel = fp32_rtol(MODEL_TERMS)
    if ad.parallel_blocks:
        close(gr["resid_pre"], gr["ln1_in"] + gr["ln2_in"] + gr["resid_post"], n_terms=3)
        close(gr["attn_out"], gr["resid_post"], n_terms=3)
        assert w[(pre, f"{L}.mlp_in")] == pytest.approx(float(gr["ln2_in"].norm()), rel=rel)
        assert w[(pre, post)] == pytest.approx(float(gr["resid_post"].norm()), rel=rel)
    else:
        close(gr["resid_pre"], gr["ln1_in"] + gr["attn_out"], n_terms=3)        # resid_pre = LN1 branch + skip
        close(gr["attn_out"], gr["ln2_in"] + gr["resid_post"], n_terms=3)       # resid_mid = LN2 branch + skip
        close(gr["mlp_out"], gr["resid_post"], n_terms=3)
        assert w[(f"{L}.resid_mid", f"{L}.mlp_in")] == pytest.approx(float(gr["ln2_in"].norm()), rel=rel)
        assert w[(pre, f"{L}.resid_mid")] == pytest.approx(float(gr["attn_out"].norm()), rel=rel)
        assert w[(f"{L}.resid_mid", post)] == pytest.approx(float(gr["resid_post"].norm()), rel=rel)
    assert w[(pre, f"{L}.attn_in")] == pytest.approx(float(gr["ln1_in"].norm()), rel=rel)
    # neuron edges: |act · grad|, coloured by the sign of −act·grad
    for e in g.edges:
        if e.kind == "mlp_act":
            n = g.node(e.source)
            assert e.weight == pytest.approx(abs(n.value), rel=1e-6)  # the same number (≤ a float32 round trip)
            assert e.color == ("blue" if n.value > 0 else "red")


def test_backward_pruning_labels_and_colours(model):
    g = flow_graph(model, TOKENS, layer=LAYER, target=TARGET, backward=True, n_heads=2, n_memory=1,
                   n_top_neurons=3, n_bottom_neurons=2)
    full = flow_graph(model, TOKENS, layer=LAYER, target=TARGET, backward=True, n_heads=-1, n_memory=-1,
                      n_top_neurons=-1)
    heads = sorted(full.nodes_of("head"), key=lambda n: -n.value)
    assert {n.head for n in g.nodes_of("head")} == {n.head for n in heads[:2]}
    scores = torch.tensor([n.value for n in sorted(full.nodes_of("mlp_value"), key=lambda n: n.neuron)])
    order = scores.argsort(descending=True).tolist()
    assert {n.neuron for n in g.nodes_of("mlp_value")} == set(order[:3] + order[-2:])
    for n in g.nodes:
        if n.kind == "concat":
            continue
        assert n.label == n.bottom[0][0]                     # backward nodes read from the bottom
        if n.kind != "bias":
            assert n.color == _palette((n.target_bottom_rank - 1) * 70 // 72)


def _palette(i):
    return PALETTE[i]


def test_backward_leaves_no_trace(model):
    flow_graph(model, TOKENS, layer=LAYER, backward=True)
    assert_no_hooks(model)
    assert_untouched(model)
