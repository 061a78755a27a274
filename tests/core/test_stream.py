"""stream(): the callback engine under capture and Reversed Attention."""

import pytest
import torch

from tl_backward import capture
from tl_backward.core.adapter import get_adapter
from tl_backward.core.metrics import target_nll
from tl_backward.core.stream import stream
from tests.reference import assert_no_hooks, assert_untouched


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
