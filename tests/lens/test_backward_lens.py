"""Backward Lens readouts, imprint/shift against real SGD steps (spec backward_lens.md §3-4, §9)."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from tests.conftest import build
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import assert_close_fp32, fp32_rtol
from tl_backward.core.adapter import get_adapter
from tl_backward.lens import backward_lens, gradient_factors
from tl_backward.lens.projection import l2_normalize


def dense_cell(ad, v, t, pred, k, normalize=False):
    """Dense logit lens of one vector: (top ids, bottom ids, target rank, pred rank)."""
    logits = ad.unembed(l2_normalize(v) if normalize else v)
    rank = lambda i: int((logits > logits[i]).sum())  # noqa: E731
    return (logits.topk(k).indices.tolist(), logits.topk(k, largest=False).indices.tolist(), rank(t), rank(pred))


@pytest.mark.parametrize("normalize", [False, True])
def test_readout_matches_dense_logit_lens(model, normalize):
    ad = get_adapter(model)
    prompts = ["the capital of france is", "a dog sat"]
    lens = backward_lens(model, prompts, " paris", modules="all", top_k=3, normalize=normalize, prepend_bos=True)
    t = int(ad.target_tokens(" paris")[0])
    # the model's own prediction, from an independent forward pass
    with torch.no_grad():
        logits = model(lens.factors.tokens, return_type="logits")
    pred = logits[torch.arange(2), lens.factors.last].argmax(-1)
    assert torch.equal(lens.pred_ids, pred)
    assert lens.target_ids.tolist() == [t, t]
    for m in lens.modules:
        r = lens[m]
        for li, l in enumerate(lens.layers):
            f = lens.factors[l, m]
            vecs = f.x if r.side == "x" else f.delta
            vecs = vecs[0] if f.per_head else vecs
            for i, (b, _) in enumerate(lens.factors.positions.tolist()):
                top, bottom, tr, pr = dense_cell(ad, vecs[i], t, int(pred[b]), 3, normalize)
                norm_zero = float(vecs[i].norm()) == 0.0
                if not norm_zero:  # zero vectors tie everywhere: any order is right
                    assert r.top_ids[li, i].tolist() == top, (m, l, i)
                    assert r.bottom_ids[li, i].tolist() == bottom, (m, l, i)
                assert (int(r.target_rank[li, i]), int(r.pred_rank[li, i])) == (tr, pr), (m, l, i)
                assert torch.isclose(r.norm[li, i], vecs[i].norm(), rtol=fp32_rtol(vecs.shape[-1]), atol=0)
    assert torch.equal(lens["q"].top_ids, lens["v"].top_ids)  # same input, projected once
    assert lens["mlp_out"].read == "bottom" and lens["mlp_in"].read == "top" and lens["o"].read == "bottom"


def test_target_sinks_to_the_bottom_of_last_layer_delta(model):
    """Top layer: δ ∝ Jᵀ W_U (p̂ − e_t) has a negative target coefficient (spec §3, 'Why')."""
    lens = backward_lens(model, "the capital of france is", " paris", modules=("mlp_out", "o"), prepend_bos=True)
    V = lens.d_vocab
    for m in ("mlp_out", "o"):
        assert int(lens[m].target_rank[-1, -1]) >= V - 3
        assert lens.decode(lens[m].bottom_ids[-1, -1, :3]).count(" paris") + lens.decode(
            lens[m].bottom_ids[-1, -1, :3]).count("paris") == 1
    # earlier positions of the last layer have δ = 0 exactly
    assert bool((lens["mlp_out"].norm[-1, :-1] == 0).all())


def test_tokens_and_indexing(gpt2_model):
    lens = backward_lens(gpt2_model, ["the cat sat", "a dog"], ["mat", "ran"], top_k=2, prepend_bos=True)
    assert lens.target_ids.tolist() == [int(get_adapter(gpt2_model).target_tokens(w)[0]) for w in ("mat", "ran")]
    assert lens.token_index((1, 2)) == 6  # row 0 has 4 tokens (BOS + 3)
    with pytest.raises(ValueError, match="padding"):
        lens.token_index((1, 3))
    assert len(lens.tokens("mlp_out", 1, -1)) == 2
    assert lens.tokens("mlp_out", 1, -1) == lens.decode(lens["mlp_out"].bottom_ids[1, -1])
    assert lens.tokens("mlp_in", 0, 0) == lens.decode(lens["mlp_in"].top_ids[0, 0])
    with pytest.raises(KeyError, match="not projected"):
        lens["q"]
    with pytest.raises(ValueError, match="which must be"):
        lens.tokens("mlp_in", 0, 0, which="middle")


def _sgd_step(ad, layer, module, update_tl):
    """W ← W + update (TL layout [d_in, d_out]) on the bridge's real parameter."""
    mod = ad.linear(layer, module).original_component
    with torch.no_grad():
        mod.weight += update_tl if isinstance(mod, Conv1D) else update_tl.T


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_imprint_and_shift_match_real_sgd_step(family):
    model = build(family)
    ad = get_adapter(model)
    prompt, lr, layer = "the big dog sat on a red", 0.5, 0
    lens = backward_lens(model, prompt, " mat", modules=("mlp_in", "mlp_out"), prepend_bos=True)
    t = 4
    pred = lens.imprint_shift(t, lr)
    tokens = lens.factors.tokens
    pre_name = ad.hook_name("mlp_pre_linear" if ad.gated_mlp else "mlp_pre", layer)
    out_name = ad.hook_name("mlp_out", layer)

    def run():
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=[pre_name, out_name])
        return cache[pre_name][0].clone(), cache[out_name][0].clone()

    pre0, out0 = run()
    fi, fo = lens.factors[layer, "mlp_in"], lens.factors[layer, "mlp_out"]
    _sgd_step(ad, layer, "mlp_in", -lr * torch.outer(fi.x[t], fi.delta[t]))  # FF1 step only
    pre1, _ = run()
    imprint = pre1 - pre0
    scale = float(imprint[t].abs().max())
    assert scale > 1e-4
    # exact for a linear layer, up to fp32: pre1 − pre0 cancels, so its error is that of the two
    # d_model-long products x·W_in, sized by the pre-activations (≤ 17× the imprint here)
    size = max(float(pre0.abs().max()), float(pre1.abs().max()))
    assert_close_fp32(imprint[t], pred.imprint[layer], n_terms=ad.d_model, scale=size, what="imprint")
    # the other tokens move by −lr (x_j·x_t) δ_t
    assert_close_fp32(imprint, fi.sgd_output_change(t, lr), n_terms=ad.d_model, scale=size, what="all tokens")

    model = build(family)  # fresh weights for the FF2 step
    ad = get_adapter(model)
    _, out0 = run()
    _sgd_step(ad, layer, "mlp_out", -lr * torch.outer(fo.x[t], fo.delta[t]))
    _, out1 = run()
    shift = out1 - out0
    scale = float(shift[t].abs().max())
    assert scale > 1e-5
    size = max(float(out0.abs().max()), float(out1.abs().max()))  # as above, d_mlp-long products h·W_out
    assert_close_fp32(shift[t], pred.shift[layer], n_terms=ad.d_mlp, scale=size, what="shift")
    # an elementwise product with ‖x‖² (d_mlp positive terms): relative, no cancellation
    assert torch.allclose(pred.shift[layer], -lr * fo.x[t].norm() ** 2 * fo.delta[t], rtol=fp32_rtol(ad.d_mlp), atol=0)
    assert pred.position == (0, t) and pred.imprint.shape == (ad.n_layers, ad.d_mlp)


def test_leaves_no_trace(llama_model):
    backward_lens(llama_model, "the cat", " sat", modules="all")
    assert_no_hooks(llama_model)
    assert_untouched(llama_model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(top_k=0), ValueError, "top_k must be an int in"),
        (dict(top_k=10**6), ValueError, "top_k must be an int in"),
        (dict(top_k=2.5), ValueError, "top_k must be an int in"),
        (dict(modules="mlp_up"), ValueError, "unknown module"),
        (dict(layers=7), ValueError, "out of range"),
        (dict(normalize="yes"), TypeError, "normalize must be"),
    ],
)
def test_bad_input(gpt2_model, kwargs, error, match):
    with pytest.raises(error, match=match):
        backward_lens(gpt2_model, "the cat", " sat", **kwargs)


def test_bad_target_and_imprint_args(gpt2_model):
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        backward_lens(gpt2_model, "the cat", " zebra")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        backward_lens(gpt2_model, "the cat", 10**6)
    with pytest.raises(ValueError, match="target is None"):
        backward_lens(gpt2_model, "the cat", None)
    lens = backward_lens(gpt2_model, "the cat", " sat")
    with pytest.raises(ValueError, match="lr must be finite"):
        lens.imprint_shift(0, float("nan"))
    with pytest.raises(ValueError, match="token must be"):
        lens.imprint_shift(99, 0.1)
    q_only = backward_lens(gpt2_model, "the cat", " sat", modules="q")
    with pytest.raises(ValueError, match="need the MLP factors"):
        q_only.imprint_shift(0, 0.1)


def test_same_factors_as_gradient_factors(neox_model):
    lens = backward_lens(neox_model, "the cat sat", " on", modules="mlp_out", prepend_bos=False)
    gf = gradient_factors(neox_model, "the cat sat", " on", modules="mlp_out", prepend_bos=False)
    assert torch.equal(lens.factors[1, "mlp_out"].delta, gf[1, "mlp_out"].delta)
    assert lens.factors.tokens.shape[1] == 3  # BOS really off
