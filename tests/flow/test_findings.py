"""The paper's findings as checks: LN-as-filter numbers against a plain-HF recomputation, and
regularisation-neuron detection with a planted always-on neuron as positive control."""

import math

import pytest
import torch

from tests.conftest import SPECS, build
from tests.flow.conftest import hf_modules
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.core.adapter import get_adapter
from tl_backward.flow.findings import in_top_fraction, ln_filter, regularisation_neurons
from tl_backward.zoo.tiny import tiny_hf_model

PROMPTS = ["the cat sat on the mat", "paris is the capital of france", "the dog ran up", "who lives in rome ?",
           "a big red cat", "berlin is a city in germany"]


def _hf_block_inputs(hf, family, layer, tokens):
    """Inputs of LN1 and LN2 and the MLP activation of a fresh plain-HF model (forward hooks)."""
    if family == "gpt2":
        blk = hf.transformer.h[layer]
        ln1, ln2, down = blk.ln_1, blk.ln_2, blk.mlp.c_proj
    elif family == "neox":
        blk = hf.gpt_neox.layers[layer]
        ln1, ln2, down = blk.input_layernorm, blk.post_attention_layernorm, blk.mlp.dense_4h_to_h
    else:
        blk = hf.model.layers[layer]
        ln1, ln2, down = blk.input_layernorm, blk.post_attention_layernorm, blk.mlp.down_proj
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0].detach()))
             for k, m in (("x1", ln1), ("x2", ln2), ("h", down))]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen, ln1, ln2


@pytest.mark.parametrize("which", ["ln1", "ln2"])
def test_ln_filter_matches_plain_hf(model, family, which):
    ad = get_adapter(model)
    res = ln_filter(model, PROMPTS, layer=1, which=which, k=10, seed=3, prepend_bos=True, batch_size=4)
    hf = tiny_hf_model(family, **SPECS[family])
    batch = ad.tokenize(PROMPTS, True)
    seen, ln1, ln2 = _hf_block_inputs(hf, family, 1, batch.tokens)
    rows = torch.arange(len(PROMPTS))
    x = seen["x1" if which == "ln1" else "x2"][rows, batch.last]
    norm = ln1 if which == "ln1" else ln2
    mods = hf_modules(hf, family, 1)
    with torch.no_grad():
        probs = lambda v: torch.softmax(mods["lm_head"](mods["ln_f"](v)), -1)  # noqa: E731
        px, py = probs(x), probs(norm(x))
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        r = r * x.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True)
        pr, plr = probs(r), probs(norm(r))
        lg_max = max(float(mods["lm_head"](mods["ln_f"](v)).abs().max()) for v in (x, norm(x)))
    # Δ is a small difference of probabilities: its fp32 error is set by the probabilities' size
    assert_close_fp32(res.delta, (py - px).mean(0), n_terms=MODEL_TERMS, scale=float(torch.maximum(px, py).max()))
    assert_close_fp32(res.delta_random, (plr - pr).mean(0), n_terms=MODEL_TERMS,
                      scale=float(torch.maximum(pr, plr).max()))
    inter = [len(set(a.topk(10).indices.tolist()) & set(b.topk(10).indices.tolist())) / 10 for a, b in zip(px, py)]
    assert res.overlap == pytest.approx(sum(inter) / len(inter))
    ent = float((-(py * py.log()).sum(-1) / math.log(2)).mean())
    rel = fp32_rtol(MODEL_TERMS) * max(1.0, lg_max)  # a probability's relative error: its logit's absolute one
    assert res.entropy["ln_x"] == pytest.approx(ent, abs=rel * (ent + 2))  # |δH| ≤ rel·(H + 1/ln 2)
    # Δ of two distributions sums to 0, up to two fp32 sums over the vocabulary
    assert abs(float(res.delta.sum())) <= 2 * fp32_rtol(ad.d_vocab)
    gains, losses = res.top_gain(3), res.top_loss(3)
    assert gains[0][1] >= gains[-1][1] > losses[-1][1] >= losses[0][1] or gains[0][1] == losses[0][1] == 0
    real, rand = res.group_shift([5, 6])
    assert real == pytest.approx(float(res.delta[[5, 6]].sum()))  # the same two numbers, summed
    assert "LN as a filter" in res.summary()


def test_in_top_fraction():
    h = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 1.0]])
    torch.testing.assert_close(in_top_fraction(h, 2), torch.tensor([0.5, 0.5, 1.0, 0.0]), rtol=0, atol=0)  # counts / 2


def test_regularisation_neurons_find_a_planted_always_on_neuron():
    m = build("gpt2")
    hf_fresh = tiny_hf_model("gpt2", **SPECS["gpt2"])
    for hf in (m.original_model, hf_fresh):          # plant: neuron 7 of layer 1 always fires strongly
        with torch.no_grad():
            hf.transformer.h[1].mlp.c_fc.bias[7] = 40.0
    res = regularisation_neurons(m, PROMPTS, layers=[0, 1], top=5, min_fraction=0.85, prepend_bos=True,
                                 batch_size=4)
    assert (1, 7) in {(c.layer, c.neuron) for c in res.candidates}
    c = next(c for c in res.candidates if (c.layer, c.neuron) == (1, 7))
    assert c.freq_signed == 1.0 and c.freq_abs == 1.0
    # frequencies against a plain-HF recomputation
    ad = get_adapter(m)
    batch = ad.tokenize(PROMPTS, True)
    seen, _, _ = _hf_block_inputs(hf_fresh, "gpt2", 1, batch.tokens)
    h = seen["h"][torch.arange(len(PROMPTS)), batch.last]
    # fractions of counts: exact (a flipped top-5 membership would be a real difference of 1/n)
    torch.testing.assert_close(res.freq_signed[1], in_top_fraction(h, 5), rtol=0, atol=0)
    torch.testing.assert_close(res.freq_abs[1], in_top_fraction(h.abs(), 5), rtol=0, atol=0)
    # candidate statistics from its W_out row
    w = ad.W_out(1)[7]
    assert c.norm == pytest.approx(float(w.norm()), rel=fp32_rtol(ad.d_model))  # d_model squares
    assert c.outlier_ratio == pytest.approx(float(w.abs().max() / w.pow(2).mean().sqrt()), rel=fp32_rtol(ad.d_model))
    assert len(c.top_tokens) == 5 and 0 <= c.norm_percentile <= 100
    assert res.candidates[0].freq_signed == 1.0 or res.candidates[0].freq_abs == 1.0
    assert "L1 n7" in res.summary()


def test_findings_errors(gpt2_model):
    with pytest.raises(ValueError, match="which"):
        ln_filter(gpt2_model, PROMPTS, layer=0, which="ln3")
    with pytest.raises(TypeError, match="prompts"):
        ln_filter(gpt2_model, [], layer=0)
    with pytest.raises(ValueError, match="top"):
        regularisation_neurons(gpt2_model, PROMPTS, top=10_000)
    with pytest.raises(ValueError, match="position"):
        regularisation_neurons(gpt2_model, PROMPTS, top=5, position=40)
    with pytest.raises(ValueError, match="out of range"):
        ln_filter(gpt2_model, PROMPTS, layer=9)
