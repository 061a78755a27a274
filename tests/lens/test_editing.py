"""Forward Pass Shift editing (Katz et al. 2024, §5) and the edit evaluation helper."""

import itertools
import math

import pytest
import torch

from tests.conftest import SPECS, build
from tests.reference import _modules, assert_no_hooks
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.adapter import get_adapter
from tl_backward.errors import TLBackwardError
from tl_backward.lens import gradient_factors
from tl_backward.lens.editing import forward_pass_shift
from tl_backward.lens.evaluation import continuation_correct, evaluate_edits
from tl_backward.zoo.tiny import tiny_model

PROMPT = "the capital of france is"
PROMPTS = ("the capital of france is", "the cat sat on the", "the dog ran to the")
EPS32 = torch.finfo(torch.float32).eps


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(model, snap):
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), snap))


def mlp_out_last(model, layer, tokens):
    name = get_adapter(model).hook_name("mlp_out", layer)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[name], return_type="logits")
    return cache[name][0, -1].clone(), logits[0, -1].clone()


def other_target(model, prompt):
    """A token id the model does not predict after ``prompt`` (so an edit is applied)."""
    ad = get_adapter(model)
    with torch.no_grad():
        pred = int(model(ad.tokenize(prompt).tokens, return_type="logits")[0, -1].argmax())
    for word in ("rome", "berlin", "dog"):
        t = int(ad.target_tokens(" " + word)[0])
        if t != pred:
            return t
    raise AssertionError("unreachable: three distinct words")


def hf_down_proj(model, family, layer, tokens):
    """Input and output of the HF MLP out-projection at the last position, from a plain HF run."""
    module = _modules(model.original_model, family, layer)["fc_out"]
    got = {}
    handle = module.register_forward_hook(lambda m, args, out: got.update(x=args[0].detach().clone(),
                                                                          out=out.detach().clone()))
    try:
        with torch.no_grad():
            model.original_model(tokens)
    finally:
        handle.remove()
    return got["x"][0, -1], got["out"][0, -1]


# ---------------------------------------------------------------- the edit itself
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "qwen2"])
@pytest.mark.parametrize("square", [True, False], ids=["d_mlp=d_model", "d_mlp=4d_model"])
def test_mlp_out_change_matches_prediction_on_every_family(family, square):
    """Actual change of the HF out-projection's output vs η‖x‖²e_t, x and e_t read from plain HF.

    With d_mlp == d_model both weight orientations fit, so only a layout-aware edit passes.
    """
    model = tiny_model(family, **SPECS[family], **(dict(d_mlp=32) if square else {}))
    ad = get_adapter(model)
    assert (ad.d_mlp == ad.d_model) == square
    tokens = ad.tokenize(PROMPT).tokens
    snap = snapshot(model)
    for layer in range(ad.n_layers):
        x, before = hf_down_proj(model, family, layer, tokens)
        t = other_target(model, PROMPT)
        e_t = model.original_model.get_output_embeddings().weight[t].detach()
        # a step that makes the shift as large as the output, so cancellation does not hide it
        eta = float(before.norm() / (x.pow(2).sum() * e_t.norm()))
        W_before = ad.W_out(layer)
        with forward_pass_shift(model, PROMPT, t, layer=layer, eta=eta) as edit:
            assert edit.applied and edit.active
            _, after = hf_down_proj(model, family, layer, tokens)
            predicted = eta * x.pow(2).sum() * e_t
            # two fp32 outputs of a d_mlp-term dot product, each rounded to ~eps·sqrt(d_mlp) of
            # its norm (≤ 1.4e-6 here); 1e-5 of the scale leaves headroom, a transposed update is O(1) off
            scale = float(before.norm() + predicted.norm())
            assert float((after - before - predicted).norm()) <= 1e-5 * scale
            # the TL-layout view of the weight moved by exactly delta (one fp32 add per element)
            assert torch.allclose(ad.W_out(layer) - W_before, edit.delta, rtol=0,
                                  atol=4 * EPS32 * float(W_before.abs().max() + edit.delta.abs().max()))
        assert same(model, snap)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("layer", [0, -1])
def test_edit_shifts_mlp_out_by_eta_x2_e_and_undo_is_exact(family, layer):
    model = build(family)
    ad = get_adapter(model)
    tokens = ad.tokenize(PROMPT).tokens
    L = layer % ad.n_layers
    before, logits0 = mlp_out_last(model, L, tokens)
    t = other_target(model, PROMPT)
    snap = snapshot(model)
    W0 = ad.W_out(L)  # TL layout, a copy taken before the edit
    eta = 0.3
    edit = forward_pass_shift(model, PROMPT, t, layer=layer, eta=eta)
    assert edit.applied and edit.active and edit.layer == L and edit.target_id == t
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
    assert_close_fp32(ad.W_out(L) - W0, edit.delta, n_terms=2, scale=float(W0.abs().max()), what="ΔW_out")
    assert float(logits1[t] - logits0[t]) > 0  # the target's logit rises
    edit.undo()
    assert same(model, snap) and not edit.active
    edit.undo()  # idempotent
    assert same(model, snap)
    assert_no_hooks(model)


def test_unknown_weight_layout_is_refused():
    model = build("neox")
    module = get_adapter(model).linear(0, "mlp_out").original_component
    cls = module.__class__
    odd = type("OddProjection", (torch.nn.Module,), {"forward": torch.nn.Linear.forward})
    snap = snapshot(model)
    module.__class__ = odd  # same weights, a class whose layout the edit cannot know
    try:
        with pytest.raises(TLBackwardError, match="OddProjection") as err:
            forward_pass_shift(model, PROMPT, "rome", layer=0, eta=0.5)
    finally:
        module.__class__ = cls
    assert err.value.argument == "model"
    assert same(model, snap)


def test_skip_when_already_predicted(gpt2_model):
    ad = get_adapter(gpt2_model)
    with torch.no_grad():
        pred = int(gpt2_model(ad.tokenize(PROMPT).tokens, return_type="logits")[0, -1].argmax())
    snap = snapshot(gpt2_model)
    with forward_pass_shift(gpt2_model, PROMPT, pred, layer=0, eta=1.0) as edit:
        assert not edit.applied and not edit.active
        assert same(gpt2_model, snap)
        assert float(edit.delta.abs().sum()) == 0


def test_overflowing_eta_is_refused_and_leaves_the_weights():
    model = build("gpt2")
    snap = snapshot(model)
    t = other_target(model, PROMPT)
    with forward_pass_shift(model, PROMPT, t, layer=0, eta=1.0) as probe:
        largest = float(torch.outer(probe.x, probe.e_t).abs().max())
    eta = 10 * torch.finfo(torch.float32).max / largest  # finite in Python, overflows in fp32
    with pytest.raises(TLBackwardError, match="non-finite") as err:
        forward_pass_shift(model, PROMPT, t, layer=0, eta=eta)
    assert err.value.argument == "eta"
    assert same(model, snap)


# ---------------------------------------------------------------- undo in any order
def apply_edits(model, layers, eta=0.3):
    edits = []
    for prompt, layer in zip(PROMPTS, layers):
        edits.append(forward_pass_shift(model, prompt, other_target(model, prompt), layer=layer, eta=eta))
        assert edits[-1].applied
    return edits


def expected_W_out(W0, edits, layer):
    """W_out[layer] (TL layout) as the active edits on it make it: W0 + delta_1 + delta_2 …, in order."""
    W = W0[layer].clone()
    for e in edits:
        if e.active and e.layer == layer:
            W = W + e.delta
    return W


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", [(1, 1, 1), (0, 1, 0)], ids=["same-layer", "mixed-layers"])
def test_three_edits_undone_in_every_order_are_exact(family, layers):
    model = build(family)
    ad = get_adapter(model)
    snap = snapshot(model)
    W0 = {L: ad.W_out(L) for L in range(ad.n_layers)}
    for order in itertools.permutations(range(3)):
        edits = apply_edits(model, layers)
        for i in order:
            edits[i].undo()
            # bit for bit: the remaining edits re-added onto the pristine weight, in application order
            for L in range(ad.n_layers):
                assert torch.equal(ad.W_out(L), expected_W_out(W0, edits, L)), (order, i, L)
        assert same(model, snap), order


@pytest.mark.parametrize("first", ["a", "b"])
def test_two_edits_on_one_layer_undone_in_both_orders(first):
    model = build("neox")
    ad = get_adapter(model)
    snap = snapshot(model)
    W0 = ad.W_out(1)
    a, b = apply_edits(model, (1, 1))
    assert torch.equal(ad.W_out(1), W0 + a.delta + b.delta)
    done, kept = (a, b) if first == "a" else (b, a)
    done.undo()
    assert torch.equal(ad.W_out(1), W0 + kept.delta)  # exactly as if `done` had never been applied
    done.undo()  # idempotent, and it does not disturb the other edit
    assert torch.equal(ad.W_out(1), W0 + kept.delta) and kept.active and not done.active
    kept.undo()
    assert same(model, snap)


def test_exception_inside_nested_with_blocks_restores(gpt2_model):
    snap = snapshot(gpt2_model)
    with pytest.raises(RuntimeError, match="boom"):
        with forward_pass_shift(gpt2_model, PROMPT, other_target(gpt2_model, PROMPT), layer=1, eta=1.0) as a:
            with forward_pass_shift(gpt2_model, PROMPTS[1], other_target(gpt2_model, PROMPTS[1]),
                                    layer=1, eta=1.0) as b:
                assert a.active and b.active and not same(gpt2_model, snap)
                raise RuntimeError("boom")
    assert same(gpt2_model, snap) and not a.active and not b.active


def test_edit_cannot_be_reentered(gpt2_model):
    snap = snapshot(gpt2_model)
    edit = forward_pass_shift(gpt2_model, PROMPT, other_target(gpt2_model, PROMPT), layer=0, eta=1.0)
    with edit:
        with pytest.raises(TLBackwardError, match="already inside a with-block") as err:
            with edit:
                pass
        assert err.value.argument == "edit" and edit.active  # the refused entry did not undo it
    assert same(gpt2_model, snap)
    with pytest.raises(TLBackwardError, match="already undone") as err:
        with edit:
            pass
    assert err.value.argument == "edit"
    undone = forward_pass_shift(gpt2_model, PROMPT, other_target(gpt2_model, PROMPT), layer=0, eta=1.0)
    undone.undo()
    with pytest.raises(TLBackwardError, match="already undone"):
        with undone:
            pass
    assert same(gpt2_model, snap)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, argument, match",
    [
        (dict(eta=float("nan")), "eta", "eta must be finite"),
        (dict(eta=math.inf), "eta", "eta must be finite"),
        (dict(eta=-math.inf), "eta", "eta must be finite"),
        (dict(eta=0.0), "eta", "eta must be > 0"),
        (dict(eta=-1.0), "eta", "eta must be > 0"),
        (dict(eta="big"), "eta", "eta must be a number"),
        (dict(eta=True), "eta", "eta must be a number"),
        (dict(eta=None), "eta", "eta must be a number"),
        (dict(eta=1 + 1j), "eta", "eta must be a number"),
        (dict(eta=torch.tensor([1.0, 2.0])), "eta", "eta must be a number"),
        (dict(layer=5), "layer", "out of range"),
        (dict(layer=-3), "layer", "out of range"),
        (dict(layer=True), "layer", "layer must be an int"),
        (dict(layer=1.0), "layer", "layer must be an int"),
        (dict(layer="1"), "layer", "layer must be an int"),
        (dict(layer=None), "layer", "layer must be an int"),
        (dict(target="zebra"), "target", "not in the model's vocabulary"),
        (dict(target=None), "target", "target is None"),
        (dict(target=""), "target", "empty"),
        (dict(target=3.5), "target", "target must be"),
        (dict(target=True), "target", "not a bool"),
        (dict(target=10 ** 6), "target", "outside the vocabulary"),
        (dict(prompt=["a", "b"]), "prompt", "prompt must be a string"),
        (dict(prompt=None), "prompt", "prompt must be a string"),
        (dict(prompt="   "), "prompt", "empty"),
        (dict(prompt="the " * 100), "prompt", "context"),
        (dict(prepend_bos="yes"), "prepend_bos", "prepend_bos must be"),
        (dict(prepend_bos=1), "prepend_bos", "prepend_bos must be"),
    ],
)
def test_bad_input(gpt2_model, kwargs, argument, match):
    args = dict(prompt=PROMPT, target="rome", layer=0, eta=0.5) | kwargs
    snap = snapshot(gpt2_model)
    with pytest.raises(TLBackwardError, match=match) as err:
        forward_pass_shift(gpt2_model, args.pop("prompt"), args.pop("target"), **args)
    assert err.value.argument == argument
    assert same(gpt2_model, snap)
    assert_no_hooks(gpt2_model)


def test_accepted_number_types(gpt2_model):
    """numpy-style integers / 0-d tensors are fine for layer and eta; the result is the same edit."""
    numpy = pytest.importorskip("numpy")
    snap = snapshot(gpt2_model)
    t = other_target(gpt2_model, PROMPT)
    with forward_pass_shift(gpt2_model, PROMPT, t, layer=1, eta=0.5) as ref:
        W_ref = get_adapter(gpt2_model).W_out(1)
    with forward_pass_shift(gpt2_model, PROMPT, t, layer=numpy.int64(-1), eta=torch.tensor(0.5)) as edit:
        assert edit.layer == 1 and edit.eta == 0.5 and torch.equal(get_adapter(gpt2_model).W_out(1), W_ref)
    assert ref.layer == 1 and same(gpt2_model, snap)


def test_refuses_compatibility_mode():
    model = build("gpt2")
    model.enable_compatibility_mode()
    with pytest.raises(TLBackwardError, match="compatibility mode") as err:
        forward_pass_shift(model, PROMPT, "rome", layer=0, eta=0.5)
    assert err.value.argument == "model"
    with pytest.raises(TLBackwardError, match="compatibility mode"):
        evaluate_edits(model, REQUESTS, layer=0, eta=0.5, progress=False)


# ---------------------------------------------------------------- evaluation
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


@pytest.mark.parametrize(
    "prompts, targets, argument",
    [
        ("the cat", ["dog"], "prompts"),  # a string would be split into characters
        (["the cat"], "dog", "targets"),
        ([], [], "prompts"),
        (["the cat", "a dog"], ["mat"], "targets"),
        ([3], ["mat"], "prompts"),
        (["the cat"], ["zebra"], "targets"),
        (["the cat"], [None], "targets"),
    ],
)
def test_continuation_correct_bad_input(gpt2_model, prompts, targets, argument):
    with pytest.raises(TLBackwardError) as err:
        continuation_correct(gpt2_model, prompts, targets)
    assert err.value.argument == argument


def test_evaluate_edits(gpt2_model):
    snap = snapshot(gpt2_model)
    base = evaluate_edits(gpt2_model, REQUESTS, progress=False)
    assert base.eta is None and base.layer is None and not bool(base.applied.any())
    # the baseline equals direct scoring of the unedited model
    ok = continuation_correct(gpt2_model, [REQUESTS[1]["prompt"]], ["dog"])
    assert float(base.efficacy[1]) == float(ok[0])
    ev = evaluate_edits(gpt2_model, REQUESTS, layer=-1, eta=100.0, progress=False)
    assert ev.applied.tolist() == [True, True] and ev.layer == 1
    assert ev.summary()["efficacy"] == 1.0  # a huge step always wins on the edited prompt
    assert set(ev.summary()) == {"efficacy", "paraphrase", "neighborhood", "n", "applied"}
    assert "FPS layer 1" in str(ev)
    assert same(gpt2_model, snap)  # every edit undone


def ok_request(**changes):
    return dict(REQUESTS[1]) | changes


@pytest.mark.parametrize(
    "kwargs, argument, match",
    [
        (dict(layer=1), "eta", "eta is missing"),  # once silently the unedited baseline
        (dict(eta=1.0), "layer", "pass layer="),
        (dict(layer=1.0, eta=1.0), "layer", "layer must be an int"),
        (dict(layer=True, eta=1.0), "layer", "layer must be an int"),
        (dict(layer=9, eta=1.0), "layer", "out of range"),
        (dict(layer=0, eta=float("inf")), "eta", "eta must be finite"),
        (dict(layer=0, eta=float("nan")), "eta", "eta must be finite"),
        (dict(layer=0, eta=True), "eta", "eta must be a number"),
        (dict(layer=0, eta=-2.0), "eta", "eta must be > 0"),
        (dict(progress="no"), "progress", "progress must be"),
        (dict(prepend_bos="yes"), "prepend_bos", "prepend_bos must be"),
        (dict(requests=REQUESTS[0]), "requests", "list of CounterFact-style dicts"),
        (dict(requests="the cat"), "requests", "list of CounterFact-style dicts"),
        (dict(requests=[]), "requests", "requests is empty"),
        (dict(requests=["x"]), "requests", r"requests\[0\] must be a dict"),
        (dict(requests=[dict(prompt="a", target_new="dog", paraphrases=[], neighborhood=[])]),
         "requests", r"lacks \['target_true'\]"),
        (dict(requests=[ok_request(paraphrases="a cat sat on the")]), "requests", "must be a list of prompts"),
        (dict(requests=[REQUESTS[0], ok_request(paraphrases=[3])]), "requests",
         r"requests\[1\]\['paraphrases'\]\[0\] must be a string"),
        (dict(requests=[ok_request(neighborhood=["   "])]), "requests", "empty"),
        (dict(requests=[ok_request(prompt=5)]), "requests", r"\['prompt'\] must be a string"),
        (dict(requests=[ok_request(target_new="zebra")]), "requests", r"\['target_new'\].*vocabulary"),
        (dict(requests=[ok_request(target_true=None)]), "requests", "is None"),
        (dict(requests=[ok_request(neighbourhood=["the cat ran to the"])]), "requests", "both"),
    ],
)
def test_evaluate_edits_bad_input(gpt2_model, kwargs, argument, match):
    args = dict(requests=REQUESTS, progress=False) | kwargs
    snap = snapshot(gpt2_model)
    with pytest.raises(TLBackwardError, match=match) as err:
        evaluate_edits(gpt2_model, args.pop("requests"), **args)
    assert err.value.argument == argument
    assert same(gpt2_model, snap)
    assert_no_hooks(gpt2_model)
