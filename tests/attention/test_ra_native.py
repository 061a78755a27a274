"""Reversed Attention and attention patching on TransformerLens's own constructors.

``TransformerBridge.boot_native(cfg)`` (and a legacy TransformerLens checkpoint loaded into it) wraps
``NativeAttention``, which multiplies the *hooked* pattern by V, while its ``hook_attn_scores``
fires afterwards on the returned pattern (core/attention_kinds.py, ``PatternRoute``). References:
autograd on the plain ``NativeModel`` with the same weights (tests/conformance/native.py).
"""

import pytest
import torch

from tests.conformance import hf_ref as R
from tests.conformance.native import build_legacy, build_native
from tests.reference import assert_no_hooks, assert_untouched
from tl_backward import capture, patch_attention, reversed_attention
from tl_backward.core.adapter import get_adapter
from tl_backward.core.attention_kinds import PatternRoute, Unsupported
from tl_backward.core.metrics import target_nll
from tl_backward.errors import TLBackwardError

TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 8]])
TARGET = 11


@pytest.fixture(scope="module", params=[build_native, build_legacy], ids=["boot_native", "legacy"])
def pair(request):
    return request.param()


def exact_or_skip(bridge) -> None:
    """TransformerLens 3.x's NativeAttention keeps hook_pattern off the autograd path: RA is refused there
    (test_ra_and_patching_are_refused_where_the_pattern_has_no_gradient)."""
    route = get_adapter(bridge).routes[0]
    if isinstance(route, Unsupported):
        pytest.skip(route.reason)


def _reference(ref):
    """Plain-model P, ∂L/∂P and the loss for TOKENS -> TARGET at the last position."""
    run = R.run(ref, TOKENS)
    loss = R.nll(run.logits, torch.tensor([0]), torch.tensor([TOKENS.shape[1] - 1]), torch.tensor([TARGET]))
    return run.attentions, torch.autograd.grad(loss, list(run.attentions)), float(loss.detach())


def _nll(bridge) -> float:
    with torch.no_grad():
        logits = bridge(TOKENS, return_type="logits")
    return float(-torch.log_softmax(logits[0, -1].double(), -1)[TARGET])


def test_route_scale_and_ra_match_the_plain_model(pair):
    ref, bridge = pair
    exact_or_skip(bridge)
    ad = get_adapter(bridge)
    assert all(isinstance(r, PatternRoute) for r in ad.routes)
    assert ad.attn_scale(0) == pytest.approx(bridge.blocks[0].attn.original_component.scale)
    ra = reversed_attention(bridge, TOKENS, TARGET)
    ps, dps, _ = _reference(ref)
    for l, (p, dp) in enumerate(zip(ps, dps)):
        expected = R.reversed_attention(p.detach(), dp, 1.0 / ad.attn_scale(l), None, None)
        assert float(expected.norm()) > 1e-6
        # fp32 model, float64 reference formula: a ~1e-6 relative agreement is rounding
        err = float((ra.maps[l].double() - expected).norm() / expected.norm())
        assert err < 1e-4, f"layer {l}: rel. error {err:.2e}"
    assert_no_hooks(bridge)
    assert_untouched(bridge)


def test_patching_first_order_effect_is_ra_dot_dp(pair):
    """P' = P + η·RA at hook_pattern (which NativeAttention multiplies by V): dL/dη at 0 = Σ_l ⟨dP_l, RA_l⟩."""
    ref, bridge = pair
    exact_or_skip(bridge)
    ra = reversed_attention(bridge, TOKENS, TARGET)
    _, dps, base = _reference(ref)
    slope = sum(float((dp[0].double() * ra.maps[l, 0].double()).sum()) for l, dp in enumerate(dps))
    assert slope > 0
    eta = 0.01 / slope  # a loss change of ~0.01, far above fp32 loss noise (~1e-6)
    assert _nll(bridge) == pytest.approx(base, rel=1e-5)
    with patch_attention(bridge, ra, eta=eta):
        higher = _nll(bridge)
    with patch_attention(bridge, ra, eta=-eta):
        lower = _nll(bridge)
    assert (higher - lower) / (2 * eta) == pytest.approx(slope, rel=1e-3)
    assert_no_hooks(bridge)


def test_scores_hook_is_refused_by_name_and_left_out_of_filters(pair):
    _, bridge = pair
    with pytest.raises(TLBackwardError, match="hook_pattern"):
        capture(bridge, TOKENS, target_nll(TARGET), names=["blocks.0.attn.hook_attn_scores"])
    cache = capture(bridge, TOKENS, target_nll(TARGET), names=lambda n: n.startswith("blocks.0.attn.hook_"))
    assert "blocks.0.attn.hook_pattern" in cache.activations
    assert "blocks.0.attn.hook_attn_scores" not in cache.activations


def test_ra_and_patching_are_refused_where_the_pattern_has_no_gradient(pair):
    """Where NativeAttention does not take hook_pattern as its pattern_fn (TransformerLens 3.x), the
    pattern hook carries values only: RA and patching are refused naming why; the values stay capturable."""
    ref, bridge = pair
    if getattr(bridge.blocks[0].attn.original_component, "accepts_pattern_fn", False):
        pytest.skip("this TransformerLens passes hook_pattern into NativeAttention: RA is exact (tests above)")
    with pytest.raises(TLBackwardError, match="NativeAttention multiplies V by its own pattern"):
        reversed_attention(bridge, TOKENS, TARGET)
    with pytest.raises(TLBackwardError, match="NativeAttention"):
        ad = get_adapter(bridge)
        with patch_attention(bridge, torch.zeros(ad.n_layers, ad.n_heads, 7, 7), eta=1.0):
            pass
    cache = capture(bridge, TOKENS, target_nll(TARGET), names=["blocks.0.attn.hook_pattern"])
    assert torch.allclose(cache.activations["blocks.0.attn.hook_pattern"], R.run(ref, TOKENS).attentions[0].detach(),
                          atol=1e-6)
    assert_no_hooks(bridge)
