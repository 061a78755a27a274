"""stream(): the callback engine under capture and Reversed Attention."""

import pytest
import torch

from tests.reference import assert_no_hooks, assert_untouched
from tl_backward import capture, metrics
from tl_backward.core.adapter import get_adapter
from tl_backward.core.metrics import bind_metric, target_nll
from tl_backward.core.stream import stream


def test_callbacks_see_the_same_tensors_capture_copies(gpt2_model):
    ad = get_adapter(gpt2_model)
    names = [ad.hook_name("resid_pre", 1), ad.hook_name("attn_scores", 0)]
    seen_act, seen_grad = {}, {}
    run = stream(gpt2_model, ["the cat sat", "a dog"], target_nll(" big"),
                 on_activation={n: (lambda t, n=n: seen_act.__setitem__(n, t.clone())) for n in names},
                 on_gradient={n: (lambda g, n=n: seen_grad.__setitem__(n, g.clone())) for n in names})
    cache = capture(gpt2_model, ["the cat sat", "a dog"], target_nll(" big"), names=names)
    assert run.fired == frozenset(names)
    torch.testing.assert_close(run.metric, cache.metric, rtol=0, atol=0)
    for n in names:
        torch.testing.assert_close(seen_act[n], cache[n], rtol=0, atol=0)
        torch.testing.assert_close(seen_grad[n], cache.grad(n), rtol=0, atol=0)
    # hook_embed's output feeds resid_pre of layer 0 additively, so the two gradients are equal.
    layer0 = capture(gpt2_model, ["the cat sat", "a dog"], target_nll(" big"), names=[ad.hook_name("resid_pre", 0)])
    # autograd passes the gradient through the add unchanged; the same computation, so bit-identical
    torch.testing.assert_close(run.leaf_grads["hook_embed"], layer0.grad(ad.hook_name("resid_pre", 0)), rtol=0, atol=0)


def test_leaves_no_trace_also_when_a_callback_raises(gpt2_model):
    ad = get_adapter(gpt2_model)
    before = [p.requires_grad for p in gpt2_model.parameters()]

    def boom(grad):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        stream(gpt2_model, "the cat sat", target_nll(" big"), on_gradient={ad.hook_name("resid_pre", 0): boom})
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)
    assert [p.requires_grad for p in gpt2_model.parameters()] == before


def test_unknown_hook_name_is_a_clear_error(gpt2_model):
    with pytest.raises(ValueError, match="hook"):
        stream(gpt2_model, "the cat sat", target_nll(" big"), on_activation={"blocks.0.hook_nonsense": print})


def _unembed_inputs(model):
    """Record the shapes the unembedding's HF module receives (a plain torch hook, removed after)."""
    seen = []
    handle = model.unembed.original_component.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    return seen, handle


@pytest.mark.parametrize("metric", [target_nll(" big"), target_nll(torch.tensor([5, 9])),
                                    metrics.logit_diff(" big", " small")],
                         ids=["one token", "two tokens", "logit_diff"])
def test_picked_metric_unembeds_only_its_positions_with_the_same_gradients(gpt2_model, metric):
    """A target_nll/logit_diff pass unembeds [1, n, d_model] (n = picked + last rows); its metric,
    last logits and leaf gradients equal those of the same pass with full logits (forced by a hook
    at the unembedding's output)."""
    prompts = ["the cat sat on the", "a dog"]
    ad = get_adapter(gpt2_model)
    n_picked = len(bind_metric(metric, ad, ad.tokenize(prompts, None))[1].rows)
    seen, handle = _unembed_inputs(gpt2_model)
    lasts_fast, lasts_full = [], []
    try:
        fast = stream(gpt2_model, prompts, metric, on_last_logits=lasts_fast.append)
        full = stream(gpt2_model, prompts, metric, on_last_logits=lasts_full.append,
                      on_activation={"unembed.hook_out": lambda t: None})
    finally:
        handle.remove()
    assert seen == [(1, n_picked + 2, ad.d_model), (*full.batch.tokens.shape, ad.d_model)]
    # The same rows through the same weights; BLAS may block a 7-row and a 2x7-row product differently,
    # so agreement is to fp32 rounding of a d_model-term dot product, not bitwise.
    torch.testing.assert_close(fast.metric, full.metric, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lasts_fast[0], lasts_full[0], rtol=1e-5, atol=1e-5)
    assert fast.leaf_grads.keys() == full.leaf_grads.keys()
    for k in fast.leaf_grads:
        torch.testing.assert_close(fast.leaf_grads[k], full.leaf_grads[k], rtol=1e-4, atol=1e-6)
    assert_no_hooks(gpt2_model)


def test_a_hook_at_the_unembedding_keeps_full_logits(gpt2_model):
    seen, handle = _unembed_inputs(gpt2_model)
    got = {}
    try:
        run = stream(gpt2_model, ["the cat sat", "a dog"], target_nll(" big"),
                     on_activation={"unembed.hook_in": lambda t: got.__setitem__("x", t.shape)})
    finally:
        handle.remove()
    assert seen == [(*run.batch.tokens.shape, get_adapter(gpt2_model).d_model)] == [got["x"]]
