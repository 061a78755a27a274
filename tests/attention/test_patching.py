"""Attention patching (P + η·Δ at hook_pattern) and head zero-ablation (hook_z)."""

import pytest
import torch

from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.attention import patch_attention, reversed_attention, zero_heads
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.core.metrics import target_nll

PROMPT, TARGET = "paris is the capital of", " france"


def _nll(model, ids, target_id):
    with torch.no_grad():
        logits = model(ids, return_type="logits")
    return -torch.log_softmax(logits[:, -1].double(), -1)[:, target_id].sum().item()


def _patterns(model, ids, layers, with_softmax=False):
    """The patterns the model actually uses (recorded by a hook added after any patch hook), and
    optionally softmax(scores) of the same run (the unpatched pattern of that run)."""
    ad = get_adapter(model)
    seen, soft = {}, {}

    def rec(layer, into, fn):
        def hook(p, hook):
            into[layer] = fn(p.detach().clone())
        return hook

    hooks = [(ad.hook_name("pattern", l), rec(l, seen, lambda t: t)) for l in layers]
    hooks += [(ad.hook_name("attn_scores", l), rec(l, soft, lambda t: t.softmax(-1))) for l in layers]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        model(ids)
    return (seen, soft) if with_softmax else seen


def test_first_order_effect(model):
    """Patching with the prompt's own RA changes the loss by η·Σ_{l,h}(1/s_l)Σ_i Var_{P_i}(dP_i):
    η < 0 lowers it, η > 0 raises it (spec §1 property 6). P and dP come from hook_pattern."""
    ad = get_adapter(model)
    ra = reversed_attention(model, PROMPT, TARGET, prepend_bos=True)
    names = [ad.hook_name("pattern", l) for l in range(ad.n_layers)]
    cache = capture(model, PROMPT, target_nll(TARGET), names=names, prepend_bos=True)
    slope = 0.0
    for l, n in enumerate(names):
        p, dp = cache[n].double(), cache.grad(n).double()
        var = (p * dp * dp).sum(-1) - (p * dp).sum(-1) ** 2
        slope += float(var.sum()) / ad.attn_scale(l)
    assert slope > 0
    t = int(ad.target_tokens(TARGET)[0])
    ids = cache.tokens
    base = _nll(model, ids, t)
    assert base == pytest.approx(float(cache.metric), rel=fp32_rtol(MODEL_TERMS))  # two forward passes
    eta = 1.0
    with patch_attention(model, ra, eta=-eta):
        lower = _nll(model, ids, t)
    with patch_attention(model, ra, eta=eta):
        higher = _nll(model, ids, t)
    assert lower < base < higher
    # finite differences: truncation O(η²) central, O(η) one-sided; fp32 loss noise (~eps·|loss|/|Δloss|
    # ≈ 1e-4) is far below both
    assert (higher - lower) / (2 * eta) == pytest.approx(slope, rel=2e-3)
    assert (higher - base) / eta == pytest.approx(slope, rel=2e-2)
    assert (base - lower) / eta == pytest.approx(slope, rel=2e-2)
    assert_no_hooks(model)
    assert_untouched(model)


def test_patch_adds_eta_delta_without_renormalising(gpt2_model):
    ra = reversed_attention(gpt2_model, PROMPT, TARGET, prepend_bos=True)
    mean_p = ra.patterns  # batch 1: usable as the forward-attention control
    ids = ra.tokens
    clean = _patterns(gpt2_model, ids, ra.layers)
    eta = -3.0
    with patch_attention(gpt2_model, ra, eta=eta) as added:
        patched, soft = _patterns(gpt2_model, ids, ra.layers, with_softmax=True)
    assert sorted(added) == [0, 1]
    assert_close_fp32(patched[0], clean[0] + eta * ra.maps[0], n_terms=2)  # one multiply-add, any order
    assert float((patched[1] - clean[1] - eta * ra.maps[1]).abs().max()) > 0  # layer 0's patch propagates
    for l in ra.layers:  # each layer adds exactly eta * RA to the pattern it computed
        T = patched[l].shape[-1]  # the softmax and the row sums reduce over key_pos
        assert_close_fp32(patched[l], soft[l] + eta * ra.maps[l], n_terms=T, what=f"L{l}")
        assert_close_fp32(patched[l].sum(-1), torch.ones_like(patched[l].sum(-1)), n_terms=T)
    with patch_attention(gpt2_model, mean_p, eta=0.5, layers=list(ra.layers)):
        control = _patterns(gpt2_model, ids, ra.layers)
    for l in ra.layers:
        assert_close_fp32(control[l].sum(-1), torch.full_like(control[l].sum(-1), 1.5), n_terms=control[l].shape[-1])
    assert_no_hooks(gpt2_model)


def test_layers_and_heads_restrict_the_patch(llama_model):
    ra = reversed_attention(llama_model, PROMPT, TARGET, prepend_bos=True)
    ids = ra.tokens
    clean = _patterns(llama_model, ids, [0, 1])
    # (layer 1, head 2) only: layer 0 untouched; in layer 1 only head 2 changes
    with patch_attention(llama_model, ra, eta=-50.0, heads=[(1, 2)]):
        got = _patterns(llama_model, ids, [0, 1])
    torch.testing.assert_close(got[0], clean[0], atol=0, rtol=0)
    diff = (got[1] - clean[1]).abs().amax((0, 2, 3))
    assert float(diff[2]) > 0 and float(diff[[0, 1, 3]].max()) == 0.0
    # layers=[0]: layer 1's input changes only through layer 0, but layer 1 is not patched
    with patch_attention(llama_model, ra, eta=-50.0, layers=[0], heads=[1]) as added:
        got = _patterns(llama_model, ids, [0])
    assert list(added) == [0]
    diff = (got[0] - clean[0]).abs().amax((0, 2, 3))
    assert float(diff[1]) > 0 and float(diff[[0, 2, 3]].max()) == 0.0


def test_tensor_deltas_and_alignment(gpt2_model):
    ad = get_adapter(gpt2_model)
    ra = reversed_attention(gpt2_model, PROMPT, TARGET, prepend_bos=True)
    T = ra.maps.shape[-1]
    ids = ra.tokens
    clean = _patterns(gpt2_model, ids, [0, 1])
    delta4 = ra.maps[:, 0]  # [layer, head, q, k] over all layers
    with patch_attention(gpt2_model, delta4, eta=2.0):
        a = _patterns(gpt2_model, ids, [0, 1])
    with patch_attention(gpt2_model, delta4[1:], eta=2.0, layers=[1]):
        b = _patterns(gpt2_model, ids, [0, 1])
    assert_close_fp32(a[0], clean[0] + 2.0 * ra.maps[0], n_terms=2)  # one multiply-add, any order
    torch.testing.assert_close(b[0], clean[0], atol=0, rtol=0)
    # align="end": a 3x3 delta lands on the last three query/key positions
    small = torch.ones(ad.n_layers, ad.n_heads, 3, 3)
    with patch_attention(gpt2_model, small, eta=0.1, layers=None, align="end"):
        c = _patterns(gpt2_model, ids, [0])
    d = c[0] - clean[0]
    # (P + 0.1) − P: rounded at the size of P, not of 0.1
    assert_close_fp32(d[..., T - 3:, T - 3:], torch.full_like(d[..., T - 3:, T - 3:], 0.1), n_terms=2,
                      scale=float(c[0].abs().max()))
    assert float(d[..., : T - 3, :].abs().max()) == 0.0
    # a batch of two rows: per-row deltas
    two = torch.cat([ids, ids])
    per_row = torch.stack([ra.maps[:, 0], -ra.maps[:, 0]], dim=1)  # [layer, batch, head, q, k]
    with patch_attention(gpt2_model, per_row, eta=10.0):
        e = _patterns(gpt2_model, two, [0])
    # differences of patterns (size ≤ 1) from a batch of two and a batch of one
    assert_close_fp32(e[0][0] - clean[0][0], -(e[0][1] - clean[0][0]), n_terms=MODEL_TERMS,
                      scale=float(e[0].abs().max()))


def test_hooks_removed_on_errors(gpt2_model):
    ra = reversed_attention(gpt2_model, PROMPT, TARGET, prepend_bos=True)
    with pytest.raises(RuntimeError, match="boom"):
        with patch_attention(gpt2_model, ra, eta=-1.0):
            raise RuntimeError("boom")
    assert_no_hooks(gpt2_model)
    longer = get_adapter(gpt2_model).tokenize(PROMPT + " the cat", prepend_bos=True).tokens
    with pytest.raises(ValueError, match="same token length"):
        with patch_attention(gpt2_model, ra, eta=-1.0):
            gpt2_model(longer)
    assert_no_hooks(gpt2_model)
    with pytest.raises(ValueError, match="batch"):
        with patch_attention(gpt2_model, torch.zeros(2, 3, 4, 6, 6), eta=1.0):
            gpt2_model(torch.cat([ra.tokens] * 2))
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)


def test_bad_arguments(gpt2_model):
    ra = reversed_attention(gpt2_model, PROMPT, TARGET, prepend_bos=True, layers=[1])
    cases = [
        (dict(delta=ra, eta="big"), TypeError, "eta"),
        (dict(delta=ra, eta=float("nan")), TypeError, "eta"),
        (dict(delta=ra, eta=1.0, layers=[0]), ValueError, "not in the delta"),
        (dict(delta=[1, 2], eta=1.0), TypeError, "ReversedAttention"),
        (dict(delta=torch.zeros(3, 4, 6, 6), eta=1.0), ValueError, "layers"),
        (dict(delta=torch.zeros(2, 5, 6, 6), eta=1.0), ValueError, "heads"),
        (dict(delta=torch.zeros(2, 4, 6), eta=1.0), ValueError, "shape"),
        (dict(delta=ra, eta=1.0, heads=[7]), ValueError, "out of range"),
        (dict(delta=ra, eta=1.0, heads=[(0, 1)]), ValueError, "not patched"),
        (dict(delta=ra, eta=1.0, align="start"), ValueError, "align"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            with patch_attention(gpt2_model, **kwargs):
                pass
    assert_no_hooks(gpt2_model)


def test_zero_heads(model):
    """Zeroed heads contribute nothing: attn_out == Σ_{kept h} z_h W_O[h] + b_O."""
    ad = get_adapter(model)
    ids = ad.tokenize(PROMPT, prepend_bos=True).tokens
    seen = {}

    def rec(key):
        def hook(t, hook):
            seen[key] = t.detach().clone()
        return hook

    hooks = [(ad.hook_name("z", 0), rec("z")), (ad.hook_name("attn_out", 0), rec("out"))]
    with torch.no_grad():
        model.run_with_hooks(ids, fwd_hooks=hooks)
        full_z = seen["z"]
        with zero_heads(model, [(0, 1), (0, 3), (1, 0)]) as ablated:
            assert ablated == [(0, 1), (0, 3), (1, 0)]
            model.run_with_hooks(ids, fwd_hooks=hooks)
    z, out = seen["z"], seen["out"]
    assert float(z[:, :, [1, 3]].abs().max()) == 0.0
    torch.testing.assert_close(z[:, :, [0, 2]], full_z[:, :, [0, 2]], rtol=0, atol=0)  # the same forward up to hook_z
    pred = torch.einsum("bphd,hdm->bpm", z, ad.W_O(0)) + ad.b_O(0)
    assert_close_fp32(out, pred, n_terms=ad.d_model + 1, what="attn_out")  # Σ over head·d_head, + b_O
    # everything zeroed: only the bias is left
    with torch.no_grad(), zero_heads(model, [(0, h) for h in range(ad.n_heads)]):
        model.run_with_hooks(ids, fwd_hooks=hooks)
    torch.testing.assert_close(seen["out"], ad.b_O(0).expand_as(seen["out"]), atol=0, rtol=0)  # 0·W_O + b_O is exact
    with pytest.raises(ValueError, match="out of range"):
        with zero_heads(model, [(0, 9)]):
            pass
    with pytest.raises(TypeError, match="pairs"):
        with zero_heads(model, [3]):
            pass
    assert_no_hooks(model)
    assert_untouched(model)
