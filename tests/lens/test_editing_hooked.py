"""Forward Pass Shift on a HookedTransformer (TransformerLens 3.9): the edit of ``blocks[l].mlp.W_out``
against the analytic update built from the model's own activations, a hand-edited copy of the model,
exact undo, and the same edit on a TransformerBridge of the same HF weights. Skipped on TransformerLens 4.x.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

from tests.core.test_hooked import BASE, CONFIGS
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.core.compat import TL_VERSION, HookedTransformer, HookedTransformerConfig, TransformerBridge
from tl_backward.core.hooked_loading import hooked_from_hf
from tl_backward.errors import TLBackwardError
from tl_backward.lens.editing import forward_pass_shift
from tl_backward.lens.evaluation import evaluate_edits
from tl_backward.zoo.tiny import tiny_hf_model, word_tokenizer

pytestmark = pytest.mark.skipif(HookedTransformer is None,
                                reason=f"TransformerLens {TL_VERSION} has no HookedTransformer (removed in 4.0)")

PROMPT = "the capital of france is"
PROMPTS = ("the capital of france is", "the cat sat on the", "the dog ran to the")
DENSE = ("gpt2_ln", "llama_gqa_rotary_gated", "neox_parallel_partial_rotary", "softcap_inverse_scale_lnpre")


def hooked(name: str, **extra):
    """A tiny random HookedTransformer with the word tokenizer (every parameter perturbed, as in
    tests/core/test_hooked.py, so zero biases and unit gains hide nothing)."""
    tok = word_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = HookedTransformerConfig(**(BASE | dict(d_vocab=len(tok), n_ctx=16)), **CONFIGS[name], **extra)
        model = HookedTransformer(cfg, tokenizer=tok).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), snap))


def own_run(model, tokens, layer):
    """(hook_post, hook_mlp_out at the last position, last logits) from the model's own forward."""
    names = [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    return cache[names[0]][0, -1].clone(), cache[names[1]][0, -1].clone(), logits[0, -1].clone()


def other_target(model, tokens):
    pred = int(own_run(model, tokens, 0)[2].argmax())
    return next(t for t in (25, 30, 20) if t != pred)


@pytest.mark.parametrize("name", DENSE)
def test_edit_is_the_analytic_update_and_equals_a_hand_edit(name):
    model = hooked(name)
    ad = get_adapter(model)
    tokens = ad.tokenize(PROMPT).tokens
    eta = 0.7
    for layer in range(ad.n_layers):
        weight, out_in = ad.mlp_out_weight(layer)
        assert weight is model.blocks[layer].mlp.W_out and not out_in
        snap, W0 = snapshot(model), weight.detach().clone()
        x, before, _ = own_run(model, tokens, layer)
        t = other_target(model, tokens)
        e_t = model.W_U[:, t].detach()
        by_hand = copy.deepcopy(model)
        with torch.no_grad():
            by_hand.blocks[layer].mlp.W_out.add_(eta * torch.outer(x, e_t))  # FPS: W_out += η x ⊗ e_t
        edit = forward_pass_shift(model, PROMPT, t, layer=layer, eta=eta)
        assert edit.applied and edit.active
        assert torch.equal(edit.x, x) and torch.equal(edit.e_t, e_t)
        assert torch.equal(weight, by_hand.blocks[layer].mlp.W_out)  # the same fp32 ops: bit for bit
        assert torch.equal(weight, W0 + edit.delta)
        with torch.no_grad():
            assert torch.equal(model(tokens), by_hand(tokens))
        _, after, _ = own_run(model, tokens, layer)
        size = max(float(before.abs().max()), float(after.abs().max()))
        expected = eta * x.pow(2).sum() * e_t  # the MLP output at the last position gains η‖x‖² e_t
        assert_close_fp32(after - before, expected, n_terms=ad.d_mlp, scale=size, what="mlp_out change")
        assert_close_fp32(edit.mlp_out_change, expected, n_terms=ad.d_mlp)
        edit.undo()
        assert same(model, snap) and not edit.active
    assert_no_hooks(model)
    assert_untouched(model)


def test_three_edits_undone_in_every_order_are_exact():
    model = hooked("llama_gqa_rotary_gated")
    ad = get_adapter(model)
    snap = snapshot(model)
    W0 = {L: ad.W_out(L) for L in range(ad.n_layers)}
    for order in itertools.permutations(range(3)):
        edits = [forward_pass_shift(model, p, other_target(model, ad.tokenize(p).tokens), layer=L, eta=0.3)
                 for p, L in zip(PROMPTS, (1, 0, 1))]
        assert all(e.applied for e in edits)
        for i in order:
            edits[i].undo()
            for L in range(ad.n_layers):
                W = W0[L].clone()
                for e in edits:
                    if e.active and e.layer == L:
                        W = W + e.delta
                assert torch.equal(ad.W_out(L), W), (order, i, L)
        assert same(model, snap), order


def test_processed_weights_are_edited_as_held():
    """fold_ln / center_writing_weights / center_unembed: the edit uses the processed W_U column and W_out
    the model holds (module docstring), and is still exactly W_out += η x ⊗ e_t with the identity intact."""
    model = hooked("gpt2_ln")
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    ad = get_adapter(model)
    tokens = ad.tokenize(PROMPT).tokens
    x, before, _ = own_run(model, tokens, 1)
    t = other_target(model, tokens)
    snap = snapshot(model)
    with forward_pass_shift(model, PROMPT, t, layer=1, eta=0.5) as edit:
        assert torch.equal(edit.e_t, model.W_U[:, t].detach())
        assert_close_fp32(edit.e_t.sum(), torch.tensor(0.0), n_terms=ad.d_model,
                          scale=float(edit.e_t.abs().max()))  # centred W_U: a processed column
        _, after, _ = own_run(model, tokens, 1)
        size = max(float(before.abs().max()), float(after.abs().max()))
        assert_close_fp32(after - before, 0.5 * x.pow(2).sum() * edit.e_t, n_terms=ad.d_mlp, scale=size)
    assert same(model, snap)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_same_edit_as_on_a_bridge_of_the_same_weights(family):
    """A HookedTransformer converted from an HF model (TransformerLens's own weight conversion, raw) and a
    TransformerBridge of the same HF weights (GPT-2: Conv1D [in, out]; Llama: nn.Linear [out, in]) get the
    same FPS update (TL layout) and the same logits after it."""
    hf = tiny_hf_model(family, seed=0, n_heads=4, **(dict(n_kv_heads=2) if family == "llama" else {}))
    model = hooked_from_hf(copy.deepcopy(hf), word_tokenizer(), f"tiny-{family}", torch.device("cpu"),
                           torch.float32)
    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=copy.deepcopy(hf),
                                                 tokenizer=word_tokenizer()).eval()
    assert get_adapter(bridge).mlp_out_weight(1)[1] == (family == "llama")
    tokens = get_adapter(model).tokenize(PROMPT, True).tokens
    assert torch.equal(tokens, get_adapter(bridge).tokenize(PROMPT, True).tokens)
    t = other_target(model, tokens)
    with forward_pass_shift(model, PROMPT, t, layer=1, eta=0.5, prepend_bos=True) as a, \
            forward_pass_shift(bridge, PROMPT, t, layer=1, eta=0.5, prepend_bos=True) as b:
        assert a.applied and b.applied
        assert_close_fp32(a.x, b.x, n_terms=MODEL_TERMS)
        assert_close_fp32(a.e_t, b.e_t, n_terms=1)
        assert_close_fp32(a.delta, b.delta, n_terms=MODEL_TERMS)
        assert_close_fp32(get_adapter(model).W_out(1), get_adapter(bridge).W_out(1), n_terms=MODEL_TERMS)
        with torch.no_grad():
            assert_close_fp32(model(tokens), bridge(tokens), n_terms=MODEL_TERMS, what="edited logits")


def test_evaluate_edits_restores_a_hooked_model():
    model = hooked("gpt2_ln")
    snap = snapshot(model)
    request = dict(prompt=PROMPT, target_new="rome", target_true="paris", paraphrases=["the city of france is"],
                   neighborhood=["the capital of italy is"])
    ev = evaluate_edits(model, [request], layer=1, eta=100.0, progress=False)
    assert ev.applied.tolist() == [True] and ev.layer == 1
    assert same(model, snap)  # the edit was undone after scoring


@pytest.mark.parametrize("name, extra, match", [
    ("attn_only", {}, "attention-only"),
    ("gpt2_ln", dict(num_experts=4, experts_per_token=2), "mixtures of 4 experts"),
    ("llama_gqa_rotary_gated", dict(use_normalization_before_and_after=True), "use_normalization_before_and_after"),
])
def test_models_without_a_dense_mlp_are_refused(name, extra, match):
    model = hooked(name, **extra)
    snap = snapshot(model)
    with pytest.raises(TLBackwardError, match=match) as err:
        forward_pass_shift(model, PROMPT, "rome", layer=0, eta=0.5)
    assert err.value.argument == "model"
    assert same(model, snap)
    assert_no_hooks(model)
