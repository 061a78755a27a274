"""Forward Pass Shift editing (spec backward_lens.md §5, §9) and the edit evaluation helper."""

import math

import pytest
import torch

from tests.conftest import build
from tests.reference import assert_no_hooks
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.lens import gradient_factors
from tl_backward.lens.editing import continuation_correct, evaluate_edits, forward_pass_shift

PROMPT = "the capital of france is"


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), snap))


def mlp_out_last(model, layer, tokens):
    name = get_adapter(model).hook_name("mlp_out", layer)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[name], return_type="logits")
    return cache[name][0, -1].clone(), logits[0, -1].clone()


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("layer", [0, -1])
def test_edit_shifts_mlp_out_by_eta_x2_e_and_undo_is_exact(family, layer):
    model = build(family)
    ad = get_adapter(model)
    tokens = ad.tokenize(PROMPT).tokens
    L = layer % ad.n_layers
    before, logits0 = mlp_out_last(model, L, tokens)
    target = "rome" if int(logits0.argmax()) != int(ad.target_tokens(" rome")[0]) else "berlin"
    snap = snapshot(model)
    eta = 0.3
    edit = forward_pass_shift(model, PROMPT, target, layer=layer, eta=eta)
    assert edit.applied and edit.active and edit.layer == L
    t = int(ad.target_tokens(" " + target)[0])
    # x_n is the W_out input at the last position: compare with the factor from the backward pass
    gf = gradient_factors(model, PROMPT, " paris", modules="mlp_out", layers=L)
    assert_close_fp32(edit.x, gf[L, "mlp_out"].x[-1], n_terms=MODEL_TERMS)  # two forward passes
    assert torch.equal(edit.e_t, ad.W_U[:, t])
    after, logits1 = mlp_out_last(model, L, tokens)
    expected = eta * edit.x.pow(2).sum() * ad.W_U[:, t]
    # after − before cancels: its error is that of the two d_mlp-long W_out products, sized by mlp_out
    size = max(float(before.abs().max()), float(after.abs().max()))
    assert_close_fp32(after - before, expected, n_terms=ad.d_mlp, scale=size, what="mlp_out change")
    assert_close_fp32(edit.mlp_out_change, expected, n_terms=ad.d_mlp)  # ‖x‖² over d_mlp
    # (W + Δ) − W is rounded at the size of W, not of Δ
    W0 = snap_W_out(snap, model, L)
    assert_close_fp32(ad.W_out(L) - W0, edit.delta, n_terms=2, scale=float(W0.abs().max()), what="ΔW_out")
    assert float(logits1[t] - logits0[t]) > 0  # the target's logit rises
    edit.undo()
    assert same(model, snap) and not edit.active
    edit.undo()  # idempotent
    assert same(model, snap)
    assert_no_hooks(model)


def snap_W_out(snap, model, layer):
    """W_out of ``layer`` (TL layout) from a parameter snapshot."""
    lin = get_adapter(model).linear(layer, "mlp_out").original_component
    idx = [p is lin.weight for p in model.parameters()].index(True)
    w = snap[idx].float()
    return w if w.shape[0] == get_adapter(model).d_mlp else w.T


def test_context_manager_restores_even_on_error(gpt2_model):
    snap = snapshot(gpt2_model)
    with pytest.raises(RuntimeError, match="boom"):
        with forward_pass_shift(gpt2_model, PROMPT, "rome", layer=1, eta=1.0) as edit:
            assert edit.applied and not same(gpt2_model, snap)
            raise RuntimeError("boom")
    assert same(gpt2_model, snap)


def test_skip_when_already_predicted(gpt2_model):
    ad = get_adapter(gpt2_model)
    with torch.no_grad():
        pred = int(gpt2_model(ad.tokenize(PROMPT).tokens, return_type="logits")[0, -1].argmax())
    snap = snapshot(gpt2_model)
    with forward_pass_shift(gpt2_model, PROMPT, pred, layer=0, eta=1.0) as edit:
        assert not edit.applied and not edit.active
        assert same(gpt2_model, snap)
        assert float(edit.delta.abs().sum()) == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(eta=float("nan")), ValueError, "eta must be finite"),
        (dict(eta=math.inf), ValueError, "eta must be finite"),
        (dict(eta=0.0), ValueError, "eta must be > 0"),
        (dict(eta=-1.0), ValueError, "eta must be > 0"),
        (dict(eta="big"), TypeError, "eta must be a number"),
        (dict(layer=5), ValueError, "out of range"),
        (dict(layer=True), TypeError, "layer must be an int"),
        (dict(target="zebra"), ValueError, "not in the model's vocabulary"),
        (dict(target=None), ValueError, "target is None"),
        (dict(prompt=["a", "b"]), TypeError, "prompt must be a string"),
    ],
)
def test_bad_input(gpt2_model, kwargs, error, match):
    args = dict(prompt=PROMPT, target="rome", layer=0, eta=0.5) | kwargs
    snap = snapshot(gpt2_model)
    with pytest.raises(error, match=match):
        forward_pass_shift(gpt2_model, args.pop("prompt"), args.pop("target"), **args)
    assert same(gpt2_model, snap)


def test_refuses_compatibility_mode():
    model = build("gpt2")
    model.enable_compatibility_mode()
    with pytest.raises(ValueError, match="compatibility mode"):
        forward_pass_shift(model, PROMPT, "rome", layer=0, eta=0.5)


REQUESTS = [
    dict(prompt=PROMPT, target_new="rome", target_true="paris",
         paraphrases=["france has the capital", "the city of france is"],
         neighbourhood=["the capital of italy is", "the dog sat on the"]),
    dict(prompt="the cat sat on the", target_new="dog", target_true="mat",
         paraphrases=["a cat sat on the"], neighborhood=["the dog sat on the"]),
]


def test_continuation_correct_matches_manual_argmax(neox_model):
    ad = get_adapter(neox_model)
    prompts = ["the cat sat on the", "the capital of"]
    with torch.no_grad():
        preds = [int(neox_model(ad.tokenize(p).tokens, return_type="logits")[0, -1].argmax()) for p in prompts]
    words = ad.to_str_tokens(torch.tensor([preds]))[0]
    wrong = "cat" if words[1].strip() != "cat" else "dog"
    assert continuation_correct(neox_model, prompts, [words[0].strip(), wrong]).tolist() == [True, False]
    # two-token target, teacher-forced: correct iff both argmaxes match
    toks = ad.tokenize("the capital of").tokens
    with torch.no_grad():
        first = int(neox_model(toks, return_type="logits")[0, -1].argmax())
        second = int(neox_model(torch.cat([toks, torch.tensor([[first]])], 1), return_type="logits")[0, -1].argmax())
    assert continuation_correct(neox_model, ["the capital of"], [[first, second]]).tolist() == [True]
    assert continuation_correct(neox_model, ["the capital of"], [[first, (second + 1) % ad.d_vocab]]).tolist() == [False]


def test_evaluate_edits(gpt2_model):
    snap = snapshot(gpt2_model)
    base = evaluate_edits(gpt2_model, REQUESTS, progress=False)
    assert base.eta is None and not bool(base.applied.any())
    # the baseline equals direct scoring of the unedited model
    ok = continuation_correct(gpt2_model, [REQUESTS[1]["prompt"]], ["dog"])
    assert float(base.efficacy[1]) == float(ok[0])
    ev = evaluate_edits(gpt2_model, REQUESTS, layer=1, eta=100.0, progress=False)
    assert ev.applied.tolist() == [True, True]
    assert ev.summary()["efficacy"] == 1.0  # a huge step always wins on the edited prompt
    assert set(ev.summary()) == {"efficacy", "paraphrase", "neighborhood", "n", "applied"}
    assert "FPS layer 1" in str(ev)
    assert same(gpt2_model, snap)  # every edit undone


def test_evaluate_edits_bad_input(gpt2_model):
    with pytest.raises(ValueError, match=r"lacks \['target_true'\]"):
        evaluate_edits(gpt2_model, [dict(prompt="a", target_new="b", paraphrases=[], neighborhood=[])], progress=False)
    with pytest.raises(TypeError, match="list of CounterFact-style dicts"):
        evaluate_edits(gpt2_model, REQUESTS[0], progress=False)
    with pytest.raises(ValueError, match="pass layer="):
        evaluate_edits(gpt2_model, REQUESTS, eta=1.0, progress=False)
    with pytest.raises(ValueError, match="eta must be finite"):
        evaluate_edits(gpt2_model, REQUESTS, layer=0, eta=float("inf"), progress=False)
