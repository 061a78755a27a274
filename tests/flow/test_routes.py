"""Flow graphs on bridges whose hook_attn_scores is off the autograd path, against independent
references: OPT (q pre-multiplied by ``scaling`` after hook_q) and GPT-Neo (no scale, a local
layer) on the HF-delegating bridge, RA read through z = P·V (ValueRoute); boot_native and a legacy
TL checkpoint, RA read at hook_pattern (PatternRoute). GPT-J (q/k rotated inside HF, unhooked) is
refused naming that reason.

References: the untouched HF copy (tests/families.py) or the plain NativeModel
(tests/conformance/native.py) run by tests/conformance/hf_ref.py -- its attention probabilities P
and their autograd gradient dP give RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s -- and the bridge's own
autograd gradients at hook_k / hook_v / ln1 output, which do not go through any RA formula.
"""

import pytest
import torch

from tests.conformance import hf_ref as R
from tests.conformance.cells import ONE, built
from tests.flow.conftest import metric_at
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.attention import patch_attention, reversed_attention
from tl_backward.core.adapter import get_adapter
from tl_backward.core.attention_kinds import PatternRoute, Unsupported, ValueRoute
from tl_backward.core.capture import capture
from tl_backward.errors import TLBackwardError
from tl_backward.flow import flow_graph, flow_hook_names
from tl_backward.flow import vectors as V
from tl_backward.flow.build import _gather, _rotary
from tl_backward.flow.rules import gather_layer

ROWS = {"opt": ValueRoute, "gpt_neo": ValueRoute, "boot_native": PatternRoute, "TL legacy checkpoint": PatternRoute}
TARGET = 30


def close(a, b, *, scale=None, what=""):
    """fp32 agreement of values from one forward (+ backward) of the bridge vs the reference."""
    b = torch.as_tensor(b).detach()
    assert float(b.abs().max()) > 0, f"{what}: all-zero reference (the check cannot fail)"
    assert_close_fp32(a, b, n_terms=MODEL_TERMS, scale=scale, what=what)


@pytest.fixture(scope="module", params=list(ROWS))
def row(request):
    hf, model = built(request.param)
    ad = get_adapter(model)
    # TransformerLens 3.x's NativeAttention: hook_pattern holds the pattern used but no gradient
    # (core/attention_kinds.py): forward graphs are drawn, backward ones refused.
    routes = [r.forward if isinstance(r, Unsupported) and r.forward is not None else r for r in ad.routes]
    assert all(isinstance(r, ROWS[request.param]) for r in routes), ad.routes
    tokens = ad.tokenize(ONE, prepend_bos=True).tokens
    return request.param, hf, model, ad, tokens, ad.n_layers - 1, tokens.shape[1] - 1


def backward_or_skip(model, ad, tokens, L) -> None:
    """Skip a backward test where RA is refused (TransformerLens 3.x's NativeAttention), after checking
    that the backward graph is refused naming why."""
    route = ad.routes[L]
    if isinstance(route, Unsupported):
        with pytest.raises(TLBackwardError, match="NativeAttention"):
            flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True)
        pytest.skip(route.reason)


def _layer(ad, tokens, L, p, backward):
    (d,), _, _ = _gather(ad, tokens, [L], p, backward, None, TARGET)
    return d, gather_layer(ad, d, L, p, _rotary(ad, tokens.shape[1]))


def _hf_ra(name, hf, tokens, L, p):
    """(P, RA) [head, q, k] of layer L from the reference, loss −log p(TARGET) at p."""
    ref = R.run(hf, tokens)
    loss = -torch.log_softmax(ref.logits[0, p].float(), -1)[TARGET]
    dp, = torch.autograd.grad(loss, [ref.attentions[L]])
    c = R.attention_scale(hf, L, unscaled=name == "gpt_neo")  # scores = c·q·kᵀ
    pattern = ref.attentions[L].detach()
    return pattern[0], R.reversed_attention(pattern, dp, c, None, None)[0].float()


def test_forward_attention_is_the_models(row):
    """The pattern the forward graph draws is the reference's P, and softmax(q_p·k'_i / s) over the
    unmasked keys reproduces it (hook_q, hook_k and s consistent: OPT's scaling, GPT-Neo's s = 1)."""
    name, hf, model, ad, tokens, L, p = row
    _, T = _layer(ad, tokens, L, p, False)
    P_ref, _ = _hf_ra(name, hf, tokens, L, p)
    row_ref = P_ref[:, p, :p + 1]
    close(T.pattern, row_ref, what="pattern at p")
    logits = torch.einsum("he,khe->hk", T.query, T.keys) / T.attn_scale
    logits = logits.masked_fill(row_ref == 0, float("-inf"))
    close(logits.softmax(-1), row_ref, what="softmax(q·k'/s)")
    if name == "gpt_neo":
        assert bool((row_ref == 0).any())  # the local layer masks keys outside its window


def test_forward_nodes_decompose_the_attention(row):
    """Head outputs + b_O = attn_out; the memory-key node W_Q[j]k'_i dotted with a difference of
    attn_in rows is the difference of q·k'_i (W_Q's layout is hook_q's, biases cancel)."""
    name, hf, model, ad, tokens, L, p = row
    d, T = _layer(ad, tokens, L, p, False)
    g = flow_graph(model, tokens[0], layer=L, target=TARGET, n_heads=-1, n_memory=-1, n_top_neurons=-1)
    heads = sum(g.node(f"L{L}.H{j}.A").vector for j in range(ad.n_heads))
    close(heads + ad.b_O(L), g.node(f"L{L}.attn_out").vector, what="Σ head outputs + b_O")
    ref = R.run(hf, tokens)
    close(g.node(f"resid{L}").vector, ref.resid_pre[L][0, p], what="resid_pre node")
    close(g.node(f"resid{L + 1}").vector, ref.resid_post[L][0, p], what="resid_post node")
    dx = d.acts["attn_in"][p] - d.acts["attn_in"][0]
    dq = d.acts["q"][p] - d.acts["q"][0]
    for j in range(ad.n_heads):
        for i in range(p + 1):
            key = g.node(f"L{L}.H{j}.k{i}").vector
            close(dx @ key, dq[j] @ T.keys[i, j], scale=float(dq[j].abs().max() * T.keys[:, j].abs().max()),
                  what=f"key node H{j} k{i}")


def test_backward_keys_carry_the_reference_reversed_attention(row):
    """Backward memory-key nodes W_Q[j](RA_j[p, i]·q_{p,j}) with RA from the reference's P and dP;
    resid nodes are the reference's autograd gradients."""
    name, hf, model, ad, tokens, L, p = row
    backward_or_skip(model, ad, tokens, L)
    g = flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True, n_heads=-1, n_memory=-1,
                   n_top_neurons=-1)
    P_ref, ra = _hf_ra(name, hf, tokens, L, p)
    assert float(ra[:, p].abs().max()) > 1e-6
    d, T = _layer(ad, tokens, L, p, True)
    wq = torch.einsum("hde,he->hd", ad.W_Q(L), d.acts["q"][p])  # W_Q[j] q_{p,j}
    got = torch.stack([torch.stack([g.node(f"L{L}.H{j}.k{i}").vector for i in range(p + 1)])
                       for j in range(ad.n_heads)])
    close(got, ra[:, p, :p + 1, None] * wq[:, None], what="backward key nodes")
    masked = P_ref[:, p, :p + 1] == 0  # GPT-Neo's local layer: RA exactly 0 outside the window
    assert not bool(got[masked].any())
    ref = R.run(hf, tokens)
    loss = -torch.log_softmax(ref.logits[0, p].float(), -1)[TARGET]
    g_pre, g_post = torch.autograd.grad(loss, [ref.resid_pre[L], ref.resid_post[L]])
    close(g.node(f"resid{L}").vector, g_pre[0, p], what="backward resid_pre node")
    close(g.node(f"resid{L + 1}").vector, g_post[0, p], what="backward resid_post node")
    assert_no_hooks(model)
    assert_untouched(model)


def test_backward_shares_sum_to_the_autograd_gradients(row):
    """RA read through the route gives head shares of ∂L/∂k and ∂L/∂v summing to the bridge's autograd
    gradients at hook_k / hook_v at every position, and Σ_j qkv_j = the attn_in gradient."""
    name, hf, model, ad, tokens, L, p = row
    backward_or_skip(model, ad, tokens, L)
    d, T = _layer(ad, tokens, L, p, True)
    ra = T.reversed_attention()
    group = torch.tensor([ad.kv_head(j) for j in range(ad.n_heads)])
    gk = torch.stack([V.key_grad_share(ra, d.acts["q"], pos, None, None) for pos in range(tokens.shape[1])])
    gv = torch.stack([V.value_grad_share(d.acts["pattern"], d.grads["z"], pos) for pos in range(tokens.shape[1])])
    summed = lambda x: torch.zeros(x.shape[0], ad.n_kv_heads, x.shape[2]).index_add_(1, group, x)  # noqa: E731
    close(summed(gk), d.grads["k"], what="∂L/∂k at every position")  # GPT-Neo's local layer: 0 out of window
    close(summed(gv), d.grads["v"], what="∂L/∂v at every position")
    g = flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True, n_heads=-1, n_memory=1)
    qkv = sum(g.node(f"L{L}.H{j}.qkv").vector for j in range(ad.n_heads))
    close(qkv, g.node(f"L{L}.attn_in").vector, what="Σ qkv_j")
    close(g.node(f"L{L}.attn_in").vector, d.grads["attn_in"][p], what="attn_in node")


def test_backward_graph_from_a_cache_equals_its_own_pass(row):
    """flow_hook_names(backward=True) captures what the route needs (hook_pattern is values-only on the
    HF-delegating bridge) and the graph read off that cache is the graph of its own pass."""
    name, hf, model, ad, tokens, L, p = row
    backward_or_skip(model, ad, tokens, L)
    cache = capture(model, tokens, metric_at(p, TARGET), names=flow_hook_names(model, L, backward=True))
    own = flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True, n_heads=-1, n_memory=-1)
    shared = flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True, n_heads=-1, n_memory=-1,
                        cache=cache)
    assert [n.id for n in own.nodes] == [n.id for n in shared.nodes]
    got = torch.stack([n.vector for n in shared.nodes if n.vector is not None])
    close(got, torch.stack([n.vector for n in own.nodes if n.vector is not None]), what="node vectors")
    close(torch.tensor([n.value for n in shared.nodes]), torch.tensor([n.value for n in own.nodes]),
          what="node scores")


def test_value_route_refuses_an_edited_z(row):
    """Under patch_attention (which edits hook_z on the HF-delegating bridge) z ≠ P·V: the backward
    graph is refused with the reason instead of drawing a wrong RA; the forward graph still works."""
    name, hf, model, ad, tokens, L, p = row
    if ROWS[name] is not ValueRoute:
        pytest.skip("PatternRoute reads dP where the model multiplies by V")
    ra = reversed_attention(model, tokens, TARGET)
    with patch_attention(model, ra, eta=-1.0):
        with pytest.raises(TLBackwardError, match="hook_z is not hook_pattern · hook_v"):
            flow_graph(model, tokens[0], layer=L, target=TARGET, backward=True)
        flow_graph(model, tokens[0], layer=L, target=TARGET)
    assert_no_hooks(model)


@pytest.mark.parametrize("backward", [False, True])
def test_gptj_is_refused_naming_its_unhooked_rotary(backward):
    hf, model = built("gptj")
    with pytest.raises(TLBackwardError, match="rotates q and k inside HF") as err:
        flow_graph(model, ONE, layer=0, target=TARGET, backward=backward)
    assert err.value.argument == "model" and "hook_cos/hook_sin" in str(err.value)
