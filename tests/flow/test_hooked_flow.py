"""Flow graphs on a HookedTransformer (TransformerLens 3.9).

1. A HookedTransformer converted from an HF GPT-2 / Llama (TransformerLens's own ``convert_*_weights``, raw)
   draws the same forward and backward graph as a TransformerBridge of the same HF weights: every node and
   edge, vectors, scores and weights to fp32 tolerance (Llama: GQA, RoPE from the HT's rotary buffers vs the
   HF rotary module, gated MLP, RMSNorm; the bridge's ln1/ln2 hooks vs the HT's derived points).
2. Tiny random HookedTransformers (rotary + GQA + gated, parallel blocks + partial rotary, ALiBi without
   norms) against the model's own activations and plain autograd: rotary tables reproduce ``hook_rot_k``
   and the scores, skeleton nodes and LN edges are autograd gradients, summed over positions the neuron
   nodes are the parameter gradients.
Skipped on TransformerLens 4.x.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.core.test_hooked import hooked, norm_reference, reference, tokens
from tests.flow.conftest import LAYER, TARGET, TOKENS
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.core.compat import POST_NORM_ARCHITECTURES, TL_VERSION, HookedTransformer, TransformerBridge
from tl_backward.core.hooked_loading import hooked_from_hf
from tl_backward.errors import TLBackwardError
from tl_backward.flow import flow_graph, flow_hook_names
from tl_backward.flow import vectors as V
from tl_backward.flow.build import _rotary
from tl_backward.zoo.tiny import tiny_hf_model, word_tokenizer

pytestmark = pytest.mark.skipif(HookedTransformer is None,
                                reason=f"TransformerLens {TL_VERSION} has no HookedTransformer (removed in 4.0)")

FULL = dict(n_heads=-1, n_memory=-1, n_top_neurons=-1)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request):
    """(HookedTransformer, TransformerBridge) of one tiny HF model's weights."""
    family = request.param
    hf = tiny_hf_model(family, seed=0, n_heads=4, **(dict(n_kv_heads=2) if family == "llama" else {}))
    model = hooked_from_hf(copy.deepcopy(hf), word_tokenizer(), f"tiny-{family}", torch.device("cpu"),
                           torch.float32)
    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=copy.deepcopy(hf),
                                                 tokenizer=word_tokenizer()).eval()
    return model, bridge


def by_kind_scale(items, size):
    """Per kind, the largest size of its members: a small member is compared at its family's size."""
    scale: dict[str, float] = {}
    for it in items:
        scale[it.kind] = max(scale.get(it.kind, 0.0), size(it))
    return scale


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_same_graph_as_the_bridge_of_the_same_weights(pair, backward):
    model, bridge = pair
    graphs = [flow_graph(m, TOKENS, layer=LAYER, target=TARGET, backward=backward, **FULL) for m in (model, bridge)]
    ht, br = graphs
    assert [n.id for n in ht.nodes] == [n.id for n in br.nodes]
    assert [(e.source, e.target, e.kind) for e in ht.edges] == [(e.source, e.target, e.kind) for e in br.edges]
    if backward:
        assert ht.metric == pytest.approx(br.metric, rel=1e-5)
    vec_scale = by_kind_scale([n for n in br.nodes if n.vector is not None], lambda n: float(n.vector.abs().max()))
    val_scale = by_kind_scale(br.nodes, lambda n: abs(n.value))
    for a, b in zip(ht.nodes, br.nodes):
        assert_close_fp32(a.value, b.value, n_terms=MODEL_TERMS, scale=val_scale[b.kind], what=f"{b.id} value")
        if b.vector is not None:
            assert_close_fp32(a.vector, b.vector, n_terms=MODEL_TERMS, scale=vec_scale[b.kind], what=b.id)
    w_scale = by_kind_scale(br.edges, lambda e: abs(e.weight))
    for a, b in zip(ht.edges, br.edges):
        assert_close_fp32(a.weight, b.weight, n_terms=MODEL_TERMS, scale=w_scale[b.kind],
                          what=f"{b.source}->{b.target}")
    assert_no_hooks(model)


def test_rotary_tables_match_the_bridge(pair):
    model, bridge = pair
    ad = get_adapter(model)
    if not ad.rotary:
        pytest.skip("absolute positions")
    for l in range(ad.n_layers):
        for a, b in zip(_rotary(ad, 9, l), _rotary(get_adapter(bridge), 9, l)):
            assert_close_fp32(a, b, n_terms=4)


# ---------------------------------------------------------------- tiny random HookedTransformers
NAMES = ("llama_gqa_rotary_gated", "neox_parallel_partial_rotary", "alibi_no_norm", "gpt2_ln")


@pytest.mark.parametrize("name", NAMES)
def test_keys_as_the_query_sees_them_reproduce_the_scores(name):
    """The rotary tables rotate hook_k into the model's own hook_rot_k, and q_p · k'_i = s · score[p, i]."""
    model = hooked(name)
    ad = get_adapter(model)
    toks = tokens()[:1]
    n = toks.shape[1]
    kinds = ["q", "k", "attn_scores"] + (["rot_k"] if ad.rotary else [])
    names = {k: ad.hook_name(k, LAYER) for k in kinds}
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=list(names.values()))
    q, k, scores = (cache[names[x]][0] for x in ("q", "k", "attn_scores"))
    cos, sin = _rotary(ad, n, LAYER)
    if ad.rotary:
        assert_close_fp32(V.rotate(k, cos, sin), cache[names["rot_k"]][0], n_terms=4)
    kv = torch.tensor([ad.kv_head(j) for j in range(ad.n_heads)])
    p = n - 1
    keys = V.keys_in_query_frame(k[:, kv], p, cos, sin)
    s = ad.attn_scale(LAYER)
    alibi = name.startswith("alibi")  # ALiBi adds a bias to the scores that q·k does not carry
    for j in range(ad.n_heads):
        dots = keys[:, j] @ q[p, j]
        if not alibi:
            assert_close_fp32(dots, s * scores[j, p], n_terms=ad.d_head * 4)
    g = flow_graph(model, toks, layer=LAYER, target=TARGET % model.cfg.d_vocab, **FULL)
    for j in range(ad.n_heads):
        for i in range(p + 1):
            assert_close_fp32(g.node(f"L{LAYER}.H{j}.k{i}").vector, ad.W_Q(LAYER)[j] @ keys[i, j], n_terms=MODEL_TERMS)


@pytest.mark.parametrize("name", NAMES)
def test_backward_skeleton_and_ln_edges_are_autograd_gradients(name):
    model = hooked(name)
    ad = get_adapter(model)
    toks = tokens()[:1]
    p = toks.shape[1] - 1
    g = flow_graph(model, toks, layer=LAYER, target=5, backward=True, **FULL)
    acts, grads, _, loss = reference(model, toks)
    norms = norm_reference(model, toks)
    grad = lambda kind: grads[ad.hook_name(kind, LAYER)][0, p]  # noqa: E731
    assert g.metric == pytest.approx(float(loss), rel=1e-5)
    close = lambda a, b: assert_close_fp32(a, b, n_terms=MODEL_TERMS)  # noqa: E731
    close(g.node(f"resid{LAYER}").vector, grad("resid_pre"))
    close(g.node(f"resid{LAYER + 1}").vector, grad("resid_post"))
    close(g.node(f"L{LAYER}.attn_out").vector, grad("attn_out"))
    close(g.node(f"L{LAYER}.mlp_out").vector, grad("mlp_out"))
    close(g.node(f"L{LAYER}.attn_in").vector, norms[(LAYER, "ln1")][3][0, p])  # ∂L/∂(ln1 output), 3 calls
    close(g.node(f"L{LAYER}.mlp_in").vector, norms[(LAYER, "ln2")][3][0, p])
    ln = {(e.source, e.target): e.weight for e in g.edges if e.kind == "ln"}
    mlp_from = f"resid{LAYER}" if ad.parallel_blocks else f"L{LAYER}.resid_mid"
    assert ln[(f"resid{LAYER}", f"L{LAYER}.attn_in")] == pytest.approx(
        float(norms[(LAYER, "ln1")][2][0, p].norm()), rel=1e-4)  # the LN1 branch of ∂L/∂resid_pre
    assert ln[(mlp_from, f"L{LAYER}.mlp_in")] == pytest.approx(float(norms[(LAYER, "ln2")][2][0, p].norm()), rel=1e-4)
    assert_no_hooks(model)
    assert_untouched(model)


@pytest.mark.parametrize("name", ["llama_gqa_rotary_gated", "neox_parallel_partial_rotary"])
def test_position_sums_are_the_parameter_gradients(name):
    """Σ_p of the W_O-row / MLP key / MLP value nodes (one loss: the NLL at the last position) is
    ∂L/∂W_O, ∂L/∂W_in (the up projection; δ at hook_pre_linear when gated), ∂L/∂W_out by plain autograd."""
    model = hooked(name)
    ad = get_adapter(model)
    toks = tokens()[:1]
    last = toks.shape[1] - 1

    def metric(logits, _):
        return -torch.log_softmax(logits[0, last].float(), -1)[5]
    _, _, pgrads, _ = reference(model, toks, lambda n: False)
    sums = {k: torch.zeros_like(pgrads[f"blocks.{LAYER}.{m}.{k}"]) for k, m in
            (("W_O", "attn"), ("W_in", "mlp"), ("W_out", "mlp"))}
    for p in range(toks.shape[1]):
        g = flow_graph(model, toks, layer=LAYER, position=p, backward=True, metric=metric, n_heads=1, n_memory=1,
                       n_top_neurons=-1)
        for n in g.nodes_of("wo_neuron"):
            sums["W_O"].view(-1, ad.d_model)[n.neuron] += n.vector
        for n in g.nodes_of("mlp_key"):
            sums["W_in"][:, n.neuron] += n.vector
        for n in g.nodes_of("mlp_value"):
            sums["W_out"][n.neuron] += n.vector
    for k, m in (("W_O", "attn"), ("W_in", "mlp"), ("W_out", "mlp")):
        assert_close_fp32(sums[k], pgrads[f"blocks.{LAYER}.{m}.{k}"], n_terms=MODEL_TERMS, what=k)


def test_graph_from_a_shared_cache_equals_its_own_pass():
    model = hooked("llama_gqa_rotary_gated")
    toks = tokens()[:1]
    names = flow_hook_names(model, LAYER, backward=True)
    assert f"blocks.{LAYER}.ln1.hook_in" in names and f"blocks.{LAYER}.ln2.hook_out" in names
    cache = capture(model, toks, lambda logits, _: -torch.log_softmax(logits[0, -1], -1)[5], names=names)
    a = flow_graph(model, toks, layer=LAYER, target=5, backward=True, cache=cache)
    b = flow_graph(model, toks, layer=LAYER, target=5, backward=True)
    assert [n.id for n in a.nodes] == [n.id for n in b.nodes]
    for x, y in zip(a.nodes, b.nodes):
        if y.vector is not None:
            assert torch.equal(x.vector, y.vector), y.id


@pytest.mark.parametrize("name, extra, match", [
    ("attn_only", {}, "attention-only"),
    ("gpt2_ln", dict(num_experts=4, experts_per_token=2), "mixtures of 4 experts"),
    ("llama_gqa_rotary_gated", dict(use_normalization_before_and_after=True), "a norm follows each sublayer"),
    ("softcap_inverse_scale_lnpre", {}, "soft-capping"),
    ("gpt2_ln", dict(use_split_qkv_input=True), "per-head inputs"),
    ("gpt2_ln", dict(original_architecture="Olmo2ForCausalLM"), "post-norm"),
    ("llama_gqa_rotary_gated", dict(rotary_adjacent_pairs=True), "rotary_adjacent_pairs"),
])
@pytest.mark.parametrize("backward", [False, True])
def test_refusals_name_the_reason(name, extra, match, backward):
    if match == "post-norm" and not POST_NORM_ARCHITECTURES:
        pytest.skip("this TransformerLens has no post-norm architectures (2.x): OLMo-2's config runs pre-norm here")
    model = hooked(name, **extra)
    with pytest.raises(TLBackwardError, match=match) as err:
        flow_graph(model, tokens()[:1], layer=LAYER, target=5, backward=backward)
    assert err.value.argument == "model"
    assert_no_hooks(model)
    assert_untouched(model)
