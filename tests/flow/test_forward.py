"""Forward flow graphs: node vectors reassemble the block's real outputs, projections match an
independent plain-HF readout, pruning/labels/colours follow VISIT's definitions."""

import math

import pytest
import torch

from tests.conftest import SPECS
from tests.flow.conftest import LAYER, P, TOKENS, hf_modules, nll_at
from tests.reference import assert_no_hooks, hf_activation_grads
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.core.adapter import get_adapter
from tl_backward.flow import flow_graph
from tl_backward.flow import vectors as V
from tl_backward.flow.build import _rotary
from tl_backward.flow.colors import PALETTE, attention_color, entropy_grey


def close(a, b):
    """fp32 agreement of vectors from (or built from) a whole forward pass, TL vs plain HF."""
    assert_close_fp32(a, b, n_terms=MODEL_TERMS)


@pytest.fixture(scope="module")
def full(model, family):
    g = flow_graph(model, TOKENS, layer=LAYER, n_heads=-1, n_memory=-1, n_top_neurons=-1)
    ref = hf_activation_grads(family, SPECS[family]["seed"], TOKENS, nll_at(P, 5), LAYER,
                              SPECS[family]["n_heads"], SPECS[family].get("n_kv_heads"))
    ad = get_adapter(model)
    names = [ad.hook_name(k, LAYER) for k in ("pattern", "attn_scores", "q", "k")]
    with torch.no_grad():
        logits, cache = model.run_with_cache(TOKENS, names_filter=names)
    return g, ref, {k: cache[n][0].float() for k, n in zip(("pattern", "scores", "q", "k"), names)}, ad, logits


def test_skeleton_nodes_are_the_activations(full):
    g, ref, _, ad, _ = full
    act = lambda k: ref[k][0][0, P]  # noqa: E731
    close(g.node(f"resid{LAYER}").vector, act("resid_pre"))
    close(g.node(f"resid{LAYER + 1}").vector, act("resid_post"))
    close(g.node(f"L{LAYER}.attn_out").vector, act("attn_out"))
    close(g.node(f"L{LAYER}.mlp_in").vector, act("mlp_in"))
    close(g.node(f"L{LAYER}.mlp_out").vector, act("mlp_out"))
    if not ad.parallel_blocks:
        close(g.node(f"L{LAYER}.resid_mid").vector, act("resid_mid"))


def test_heads_memories_and_neurons_reassemble_the_outputs(full):
    g, ref, fw, ad, _ = full
    L = f"L{LAYER}"
    W_O = ad.W_O(LAYER)
    z = ref["z"][0][0, P]
    attn_out = ref["attn_out"][0][0, P]
    heads_sum = ad.b_O(LAYER).clone()
    for j in range(ad.n_heads):
        A = g.node(f"{L}.H{j}.A").vector
        close(A, z[j] @ W_O[j])
        assert g.node(f"{L}.H{j}.A").value == pytest.approx(float(A.norm()), rel=fp32_rtol(ad.d_model))
        # A_j = Σ_i a_i (v_i W_O[j]) over the memory values
        mix = sum(fw["pattern"][j, P, i] * g.node(f"{L}.H{j}.v{i}").vector for i in range(P + 1))
        close(mix, A)
        heads_sum += A
    close(heads_sum, attn_out)
    # W_O rows: Σ_r z_r W_O[r] + b_O = attn_out, with z_r = score_r / ‖W_O[r]‖
    rows = g.nodes_of("wo_neuron")
    assert len(rows) == ad.n_heads * ad.d_head
    rebuilt = ad.b_O(LAYER) + sum(n.value / n.vector.norm() * n.vector for n in rows)
    close(rebuilt, attn_out)
    # z_r·‖W_O[r]‖ with z from HF: a small z_r is a cancellation, so compare all rows scaled by the max
    assert_close_fp32(torch.tensor([n.value for n in rows]),
                      torch.stack([z.reshape(-1)[n.neuron] * n.vector.norm() for n in rows]), n_terms=MODEL_TERMS)
    # MLP: Σ_i h_i W_out[i] + b_out = mlp_out, with h_i = score_i / ‖W_out[i]‖; keys are W_in columns
    values = g.nodes_of("mlp_value")
    h = ref["mlp_post"][0][0, P]
    close(ad.b_out(LAYER) + sum(h[n.neuron] * n.vector for n in values), ref["mlp_out"][0][0, P])
    assert_close_fp32(torch.tensor([n.value for n in values]),
                      torch.stack([h[n.neuron] * n.vector.norm() for n in values]), n_terms=MODEL_TERMS)
    for n in g.nodes_of("mlp_key"):  # a column of the weight itself
        torch.testing.assert_close(n.vector.float(), ad.W_in(LAYER)[:, n.neuron].float(), rtol=0, atol=0)


def test_memory_keys_are_keys_as_the_query_sees_them(full, model):
    """q_p · k'_i = s · score[p, i] (RoPE: k' = R_p⁻¹ R_i k_i), and key nodes are W_Q[j] k'."""
    g, _, fw, ad, _ = full
    cos, sin = _rotary(ad, TOKENS.shape[1])
    kv = torch.tensor([ad.kv_head(j) for j in range(ad.n_heads)])
    keys = V.keys_in_query_frame(fw["k"][: P + 1][:, kv], P, None if cos is None else cos[: P + 1],
                                 None if sin is None else sin[: P + 1])
    s = ad.attn_scale(LAYER)
    W_Q = ad.W_Q(LAYER)
    for j in range(ad.n_heads):
        close(keys[:, j] @ fw["q"][P, j], s * fw["scores"][j, P, : P + 1])
        for i in range(P + 1):
            close(g.node(f"L{LAYER}.H{j}.k{i}").vector, W_Q[j] @ keys[i, j])
        close(g.node(f"L{LAYER}.H{j}.q").vector, ad.W_K(LAYER)[kv[j]] @ fw["q"][P, j])


def test_projection_matches_a_plain_hf_readout(full, family, fresh_hf):
    g, _, _, ad, logits = full
    mods = hf_modules(fresh_hf(family), family, LAYER)
    assert g.target == int(logits[0, P].argmax())            # default target: the model's argmax
    for n in [g.node(f"resid{LAYER + 1}"), *g.nodes_of("mlp_value")[:3], *g.nodes_of("key")[:3]]:
        with torch.no_grad():
            lg = mods["lm_head"](mods["ln_f"](n.vector[None]))[0]
        probs = torch.softmax(lg, -1)
        top = probs.topk(5)
        assert [t for t, _ in n.top] == ad.to_str_tokens(top.indices[None])[0]
        # ln_f, lm_head, softmax: a probability's relative error is its logit's absolute error
        rel = fp32_rtol(2 * ad.d_model + ad.d_vocab) * max(1.0, float(lg.abs().max()))
        torch.testing.assert_close(torch.tensor([p for _, p in n.top]), top.values, atol=0, rtol=rel)
        assert n.target_prob == pytest.approx(float(probs[g.target]), rel=rel)
        assert n.target_rank == 1 + int((probs > probs[g.target]).sum())
        ent = float(-(probs * probs.log()).sum() / math.log(2))
        assert n.entropy == pytest.approx(ent, abs=rel * (ent + 2))  # |δH| ≤ Σ|δp|·|log₂p + 1/ln 2|


def test_pruning_labels_colours_and_edges(model, full):
    fullg, ref, fw, ad, _ = full
    g = flow_graph(model, TOKENS, layer=LAYER, n_heads=2, n_memory=2, n_top_neurons=4, n_bottom_neurons=3)
    heads = sorted(fullg.nodes_of("head"), key=lambda n: -n.value)[:2]
    assert {n.head for n in g.nodes_of("head")} == {n.head for n in heads}
    for j in (n.head for n in heads):
        a = fw["pattern"][j, P, : P + 1]
        assert {n.position for n in g.nodes_of("key") if n.head == j} == set(a.topk(2).indices.tolist())
    for kind, full_kind in (("wo_neuron", "wo_neuron"), ("mlp_value", "mlp_value")):
        scores = sorted((n.value, n.neuron) for n in fullg.nodes_of(full_kind))
        want = {i for _, i in scores[-4:]} | {i for _, i in scores[:3]}
        assert {n.neuron for n in g.nodes_of(kind)} == want
    for n in g.nodes:
        if n.kind in ("concat",):
            assert n.color == "white" and not n.top
            continue
        neg = n.kind in ("wo_neuron", "mlp_key", "mlp_value") and n.value < 0
        assert n.label == (n.bottom[0][0] if neg else n.top[0][0])
        if n.kind != "bias":
            rank = n.target_bottom_rank if neg else n.target_rank
            assert n.color == PALETTE[min(69, (rank - 1) * 70 // ad.d_vocab)]
    # edge definitions (a few from each group)
    w = {(e.source, e.target): e for e in g.edges}
    L = f"L{LAYER}"
    pre = ref["resid_pre"][0][0, P]
    rel = fp32_rtol(MODEL_TERMS)  # weights are norms of TL activations, compared with HF's
    assert w[(f"resid{LAYER}", f"{L}.attn_in")].weight == pytest.approx(float(pre.norm()), rel=rel)
    attn_out = ref["attn_out"][0][0, P]
    e = w[(f"{L}.attn_out", f"{L}.resid_mid" if not ad.parallel_blocks else f"resid{LAYER + 1}")]
    assert e.weight == pytest.approx(float(attn_out.norm()), rel=rel)
    assert e.color == entropy_grey(g.node(f"{L}.attn_out").entropy)
    for e in g.edges:
        if e.kind == "attention_key":
            n = g.node(e.target)
            a = float(fw["pattern"][n.head, P, n.position])
            assert e.weight == pytest.approx(max(10 * a, 0.51), rel=rel)
            assert e.color == attention_color(a)
        if e.kind == "mlp_act":
            h = float(ref["mlp_post"][0][0, P, g.node(e.source).neuron])
            h_max = float(ref["mlp_post"][0][0, P].abs().max())  # a small h is a cancellation
            assert e.weight == pytest.approx(1.5 * abs(h), rel=rel, abs=rel * 1.5 * h_max)
            assert e.color == ("blue" if h > 0 else "red")
        if e.kind == "concat":
            assert e.weight == pytest.approx(1.8 * g.node(e.source).norm, rel=fp32_rtol(1))  # one multiply
    # every edge joins existing nodes; nothing is orphaned
    ids = {n.id for n in g.nodes}
    assert all(e.source in ids and e.target in ids for e in g.edges)
    touched = {e.source for e in g.edges} | {e.target for e in g.edges}
    assert touched == ids
    assert_no_hooks(model)


def test_target_string_uses_first_subtoken_and_colours_follow_it(gpt2_model):
    ad = get_adapter(gpt2_model)
    g = flow_graph(gpt2_model, "the cat sat on the", layer=0, target=" mat cat", prepend_bos=True)
    assert g.target == int(ad.target_tokens(" mat cat")[0]) and g.target_token == "mat"


def test_palette_and_colour_scales():
    assert len(PALETTE) == 70 and PALETTE[0] == "lime" and PALETTE[-1] == "darkred"
    assert PALETTE.count("dimgrey") == 53 and PALETTE.count("yellow") == 3
    assert attention_color(0.0) == "rgb(240,230,140)" and attention_color(1.0) == "rgb(0,128,0)"
    assert entropy_grey(0.0) == "rgb(47,79,79)" and entropy_grey(60.0) == "rgb(211,211,211)"
