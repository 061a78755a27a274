"""capture on bridges that delegate to HF: OPT's flattened MLP region and the generic AttentionBridge
(GPT-J, OPT, GPT-Neo), checked against plain-HF autograd on a copy of the same weights
(tests/families.py builds both)."""

import pytest
import torch

from tests.families import build
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.core.metrics import target_nll
from tl_backward.errors import TLBackwardError

PROMPTS = ["the cat sat on the mat .", "where is the big dog"]  # padded: batch·pos ≠ pos
TARGET = 30


@pytest.fixture(scope="module")
def opt():
    return build("opt")


@pytest.fixture(scope="module")
def gptj():
    return build("gptj")[1]


def _hf_ln2(hf, tokens, mask, last, layer):
    """OPT's final_layer_norm output at ``layer`` (HF hands it [batch·pos, d]) and its full gradient."""
    seen = {}
    handle = hf.model.decoder.layers[layer].final_layer_norm.register_forward_hook(
        lambda mod, args, out: seen.update(out=out))
    try:
        with torch.enable_grad():
            logits = hf(tokens, attention_mask=mask.long()).logits
            rows = logits[torch.arange(len(last)), last]
            loss = -torch.log_softmax(rows.float(), -1)[:, TARGET].sum()
            (grad,) = torch.autograd.grad(loss, [seen["out"]])
    finally:
        handle.remove()
    return seen["out"].detach(), grad


@pytest.mark.parametrize("layer", [0, 1])
def test_opt_ln2_hooks_come_batch_pos_and_match_hf(opt, layer):
    """OPT flattens around final_layer_norm; ln2.hook_normalized/hook_scale come [batch, pos, …] like
    every other hook: normalized·γ + β = HF's LN output, scale = √(var + ε) of ln2.hook_in, and
    ∂L/∂normalized = ∂L/∂(LN output)·γ from HF autograd."""
    hf, model = opt
    ln = f"blocks.{layer}.ln2"
    cache = capture(model, PROMPTS, target_nll(TARGET), prepend_bos=True,
                    names=[f"{ln}.hook_in", f"{ln}.hook_normalized", f"{ln}.hook_scale"])
    b, p = cache.tokens.shape
    normed, scale, x = cache[f"{ln}.hook_normalized"], cache[f"{ln}.hook_scale"], cache[f"{ln}.hook_in"]
    assert normed.shape == (b, p, model.cfg.d_model) and scale.shape == (b, p, 1)
    assert cache.grad(f"{ln}.hook_normalized").shape == normed.shape
    assert cache.grad(f"{ln}.hook_scale").shape == scale.shape
    hf_ln = hf.model.decoder.layers[layer].final_layer_norm
    out, g_out = _hf_ln2(hf, cache.tokens, cache.mask, cache.last, layer)
    gamma, beta = hf_ln.weight.detach(), hf_ln.bias.detach()
    m = cache.mask
    assert_close_fp32((normed * gamma + beta)[m], out.reshape(b, p, -1)[m], n_terms=MODEL_TERMS, what="normalized")
    var = x.double().var(-1, unbiased=False, keepdim=True)
    assert_close_fp32(scale[m], (var + hf_ln.eps).sqrt()[m], n_terms=MODEL_TERMS, what="scale")
    assert_close_fp32(cache.grad(f"{ln}.hook_normalized")[m], (g_out.reshape(b, p, -1) * gamma)[m],
                      n_terms=MODEL_TERMS, what="∂L/∂normalized")
    assert_no_hooks(model)
    assert_untouched(model)


def test_opt_d_mlp_is_the_weights_not_the_config(opt):
    hf, model = opt
    ad = get_adapter(model)
    assert ad.d_mlp == hf.config.ffn_dim == ad.W_out(0).shape[0] != model.cfg.d_mlp


@pytest.mark.parametrize("name", ["blocks.0.attn.hook_attn_scores", "blocks.1.attn.hook_attn_scores"])
@pytest.mark.parametrize("argument", ["names", "names_filter"])
def test_attn_scores_on_the_generic_bridge_is_refused_by_name(gptj, name, argument):
    with pytest.raises(TLBackwardError, match="post-softmax.*hook_pattern.*reversed_attention") as err:
        capture(gptj, "the cat sat", target_nll(TARGET), **{argument: ["blocks.1.hook_resid_pre", name]})
    assert err.value.argument == argument and repr(name) in str(err.value)
    assert_no_hooks(gptj)


def test_attn_scores_on_the_generic_bridge_is_left_out_of_filters(gptj):
    every = capture(gptj, "the cat sat", target_nll(TARGET))
    assert not any(n.endswith("hook_attn_scores") for n in every)
    assert "blocks.0.attn.hook_pattern" in every and "blocks.0.attn.hook_pattern" not in every.gradients
    attn = capture(gptj, "the cat sat", target_nll(TARGET), names=lambda n: ".attn.hook_" in n)
    assert "blocks.1.attn.hook_pattern" in attn and not any("attn_scores" in n for n in attn)
    with pytest.raises(TLBackwardError, match="matched no hook point"):
        capture(gptj, "the cat sat", target_nll(TARGET), names=lambda n: n.endswith("hook_attn_scores"))


def test_attn_scores_is_captured_where_it_is_on_the_autograd_path(gpt2_model):
    cache = capture(gpt2_model, "the cat sat", target_nll(" mat"), names=["blocks.0.attn.hook_attn_scores"])
    assert cache.grad("attn_scores", 0).shape == cache["attn_scores", 0].shape
