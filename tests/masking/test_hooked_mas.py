"""MAS on a ``transformer_lens.HookedTransformer`` (tl_backward/masking/hooked.py) against the plain
HookedTransformer forward with a hand-written masked attention, on tiny random ``HookedTransformerConfig``
models: GPT-2-like LN, Llama-like RMS + rotary + GQA + gated MLP, attention-only, and LNPre with a local
(windowed) first layer, soft-capped scores and ``scale_attn_by_inverse_layer_idx``.

The reference (:func:`reference_logits`) runs the model with no tl_backward code: a forward hook on every
layer's ``hook_attn_scores`` throws away the scores TransformerLens computed (already causally masked) and
returns ``q·kᵀ / attn_scale`` (soft-capped) recomputed from that layer's ``hook_(rot_)q`` / ``hook_(rot_)k``,
set to -inf outside the pairwise keep-mask built by loops (``helpers.pairwise_mask``) AND the window.
Skipped on TransformerLens 4.x, which has no HookedTransformer.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

import tl_backward as tlb
from tests.core.test_hooked import BASE
from tests.core.test_hooked import CONFIGS as HOOKED_CONFIGS
from tests.core.test_hooked import hooked as hooked_config
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.compat import TL_MAJOR, TL_VERSION, HookedTransformer
from tl_backward.core.lock import lock_of, model_lock
from tl_backward.masking import (
    answer_loss,
    attention_patterns,
    mas_finetune,
    mas_generate,
    preserving_weights,
    segment_mask,
)
from tl_backward.masking import segments as S
from tl_backward.masking.experiment import answer_accuracy

from .helpers import greedy_causal, no_cache_generate, pairwise_mask, random_layout

pytestmark = pytest.mark.skipif(
    HookedTransformer is None,
    reason=f"TransformerLens {TL_VERSION} has no HookedTransformer (removed in 4.0); these tests run in a "
           "TransformerLens 3.9 venv")

# tests/core/test_hooked.py's configurations (same BASE, n_ctx 20 for the longer MAS layouts), plus a
# local-window, soft-capped, layer-scaled one.
CONFIGS = {
    **{name: HOOKED_CONFIGS[name] for name in ("gpt2_ln", "llama_gqa_rotary_gated", "attn_only")},
    "local_softcap_lnpre": dict(act_fn="gelu", normalization_type="LNPre", use_local_attn=True,
                                attn_types=["local", "global"], window_size=3, attn_scores_soft_cap=2.0,
                                scale_attn_by_inverse_layer_idx=True),
}
ALIBI = dict(act_fn="relu", normalization_type=None, positional_embedding_type="alibi")
SIDES = [None, "left", "right"]


def hooked(name: str | None = None, **cfg) -> "HookedTransformer":
    """tests/core/test_hooked.py's tiny random HookedTransformer (every parameter perturbed) of ``CONFIGS[name]``."""
    return hooked_config(None, n_ctx=20, **{**CONFIGS.get(name, {}), **cfg})


def batch(side: str | None, length: int = 9, seed: int = 0) -> S.Segments:
    """Two rows of random blocks and causal runs; with ``side`` the second row has 3 pad columns."""
    gen = torch.Generator().manual_seed(seed)
    rows = [random_layout(gen, length, pad_side=side, n_pad=3 if side and b else 0) for b in range(2)]
    ids, valid = (torch.stack(t) for t in zip(*rows))
    tokens = torch.randint(1, BASE["d_vocab"], (2, length), generator=gen).masked_fill(~valid, 0)
    return S.from_ids(tokens, ids, valid)


def window_keep(keep: torch.Tensor, window: int | None) -> torch.Tensor:
    """keep[b, 0, i, j] AND i − j < window (None: keep itself)."""
    if window is None:
        return keep
    i = torch.arange(keep.shape[-2])[:, None]
    j = torch.arange(keep.shape[-1])[None, :]
    return keep & (i - j < window)


def allowed_keys(keep: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """What MAS on a HookedTransformer lets each query see: ``keep`` AND the window, and a query with no such
    key (a left pad) its own position."""
    allowed = window_keep(keep, window)
    return allowed | ~allowed.any(-1, keepdim=True) & torch.eye(keep.shape[-1], dtype=torch.bool)


def reference_logits(model, seg: S.Segments, keep: torch.Tensor | None = None, grad: bool = False) -> torch.Tensor:
    """The HookedTransformer's own forward (attention_mask = seg.valid) with each layer's attention scores
    replaced by q·kᵀ / attn_scale (soft-capped), -inf outside ``keep`` (default: the loop-built pairwise
    mask of ``seg``) AND a local layer's window. Differentiable with ``grad=True``."""
    keep = pairwise_mask(seg.segment_ids, seg.valid) if keep is None else keep
    rotary = model.cfg.positional_embedding_type == "rotary"
    qk = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
    seen: dict[str, torch.Tensor] = {}

    def save(t, hook):
        seen[hook.name] = t

    def scores(_, hook):
        layer = int(hook.name.split(".")[1])
        attn = model.blocks[layer].attn
        q, k = (seen[f"blocks.{layer}.attn.{n}"] for n in qk)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # GQA: kv head h // group serves head h
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / attn.attn_scale
        cap = model.cfg.attn_scores_soft_cap
        if cap > 0:
            s = cap * torch.tanh(s / cap)
        window = model.cfg.window_size if attn.attn_type == "local" else None
        return s.masked_fill(~window_keep(keep, window), float("-inf"))

    hooks = [(lambda n: n.endswith(qk), save), (lambda n: n.endswith("hook_attn_scores"), scores)]
    with torch.set_grad_enabled(grad):
        return model.run_with_hooks(seg.tokens, attention_mask=seg.valid.long(), fwd_hooks=hooks)


def assert_clean(model) -> None:
    """No hook, pre-hook, shadowing attribute or parameter .grad left behind."""
    assert_no_hooks(model)
    assert_untouched(model)
    assert not model._forward_pre_hooks and not model.embed._forward_pre_hooks
    assert all("apply_causal_mask" not in vars(b.attn) for b in model.blocks)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_hand_written_masked_attention(name, side):
    model = hooked(name)
    seg = batch(side)
    ref = reference_logits(model, seg)
    with torch.no_grad(), segment_mask(model, seg):
        got = model(seg.tokens)
        _, cache = model.run_with_cache(seg.tokens, names_filter=lambda n: n.endswith("hook_attn_scores"))
    # the reference's own einsum order vs TransformerLens's, through the whole model
    assert_close_fp32(got[seg.valid], ref[seg.valid], n_terms=MODEL_TERMS, what=f"{name} {side}")
    causal = reference_logits(model, seg, pairwise_mask(seg.causal().segment_ids, seg.valid))
    assert (got[seg.valid] - causal[seg.valid]).abs().max() > 1e-3  # MAS really changed the logits
    keep = pairwise_mask(seg.segment_ids, seg.valid)
    for layer, block in enumerate(model.blocks):
        window = model.cfg.window_size if block.attn.attn_type == "local" else None
        banned = ~allowed_keys(keep, window).expand(-1, BASE["n_heads"], -1, -1)
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        assert (scores[banned] == float("-inf")).all() and torch.isfinite(scores[~banned]).all()
    assert_clean(model)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", [*CONFIGS, "alibi"])
def test_a_causal_segment_mask_gives_exactly_the_causal_logits(name, side):
    """All ids -1, or every token its own block: the keep-mask is the causal one, applied by the same torch.where
    at the same place, so the logits of every real token are bit-identical to the model's own causal forward
    with that padding (left pads differ: HookedTransformer zeroes their NaN rows, MAS lets them see themselves)."""
    model = hooked(**ALIBI) if name == "alibi" else hooked(name)
    seg = batch(side)
    singles = S.from_ids(seg.tokens, torch.where(seg.valid, seg.valid.long().cumsum(-1) - 1, -1), seg.valid)
    with torch.no_grad():
        causal = model(seg.tokens, attention_mask=seg.valid.long())
        if side is None:
            assert torch.equal(model(seg.tokens), causal)
        for s in (seg.causal(), singles):
            with segment_mask(model, s):
                assert torch.equal(model(s.tokens)[s.valid], causal[s.valid])
    assert_clean(model)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2_ln", "llama_gqa_rotary_gated"])
def test_padded_rows_equal_the_unpadded_prompt(name, side):
    """Positions count real tokens, (cumsum(valid) − 1).clamp(min=0), as on the Bridge: a padded row's real
    positions give the logits of its prompt alone; the positional embedding is W_pos at those positions."""
    model = hooked(name)
    seg = batch(side)
    with torch.no_grad(), segment_mask(model, seg):
        padded, cache = model.run_with_cache(seg.tokens)
    alone = seg.select(1)
    with torch.no_grad(), segment_mask(model, alone):
        single = model(alone.tokens)
    assert_close_fp32(padded[1][seg.valid[1]], single[0], n_terms=MODEL_TERMS, what="padded vs alone")
    if "hook_pos_embed" in cache:
        positions = (seg.valid.long().cumsum(-1) - 1).clamp(min=0)
        assert torch.equal(cache["hook_pos_embed"][seg.valid], model.W_pos[positions][seg.valid])


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("name", CONFIGS)
def test_cached_generation_equals_a_no_cache_reference(name, side):
    """KV-cached decoding = re-running the whole prefix each step with the hand-written attention: MAS on the
    prompt, causal for the generated tokens (they join no block). So each step sees the prompt through the
    cache, at the right positions, and attends causally."""
    model = hooked(name)
    seg = batch(side)
    out = mas_generate(model, seg, max_new_tokens=6, eos_token_id=None)
    ref = no_cache_generate(model, seg, 6, run=lambda cur: reference_logits(model, cur))
    assert out.new_tokens.shape == (2, 6) and out.new_valid.all()
    assert torch.equal(out.new_tokens, ref)
    assert_clean(model)


def test_all_length_one_segments_generate_like_ordinary_causal_decoding():
    model = hooked("llama_gqa_rotary_gated")
    tokens = batch(None).tokens
    singles = S.from_ids(tokens, torch.arange(tokens.shape[1]).expand(2, -1))
    out = mas_generate(model, singles, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out.new_tokens, greedy_causal(model, tokens, 6))


def test_eos_and_sampling():
    model = hooked("gpt2_ln")
    seg = batch("left")
    free = mas_generate(model, seg, max_new_tokens=6, eos_token_id=None)
    eos = int(free.new_tokens[0, 1])
    out = mas_generate(model, seg, max_new_tokens=6, eos_token_id=eos)
    stops = [int((row == eos).nonzero()[0]) if (row == eos).any() else 6 for row in free.new_tokens]
    n = min(6, max(stops) + 1)  # decoding ends once every row has stopped
    assert out.new_tokens.shape == (2, n)
    for row, stop in enumerate(stops):
        kept = min(stop + 1, n)
        assert out.new_tokens[row, :kept].tolist() == free.new_tokens[row, :kept].tolist()
        assert out.new_valid[row].tolist() == [True] * kept + [False] * (n - kept)
        assert (out.new_tokens[row, kept:] == 0).all()  # the pad id without a tokenizer
    state = torch.random.get_rng_state()
    a = mas_generate(model, seg, max_new_tokens=5, temperature=1.5, seed=3, eos_token_id=None)
    b = mas_generate(model, seg, max_new_tokens=5, temperature=1.5, seed=3, eos_token_id=None)
    assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(torch.random.get_rng_state(), state)


def test_capture_and_patterns_under_the_mask_match_autograd_through_the_reference():
    model = hooked("llama_gqa_rotary_gated")
    seg = batch("left")
    target = 5
    name = "blocks.0.hook_resid_pre"
    with segment_mask(model, seg):
        cache = tlb.capture(model, seg.tokens, tlb.metrics.target_nll(target), names=[name])
        ra = tlb.reversed_attention(model, seg.tokens, target)
    leaf = {}

    def make_leaf(x, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    with model.hooks(fwd_hooks=[(name, make_leaf)]):
        logits = reference_logits(model, seg, grad=True)
        loss = -logits[:, -1].log_softmax(-1)[:, target].sum()
        (grad,) = torch.autograd.grad(loss, [leaf["x"]])
    assert_close_fp32(cache.metric, loss.detach(), n_terms=MODEL_TERMS)  # two forward passes
    assert_close_fp32(cache[name + "_grad"], grad, n_terms=MODEL_TERMS)
    banned = ~allowed_keys(pairwise_mask(seg.segment_ids, seg.valid)).expand(-1, BASE["n_heads"], -1, -1)
    assert (ra.maps[:, banned] == 0).all() and torch.isfinite(ra.maps).all()  # no gradient through banned entries
    # ... but through the future ones MAS allows (layer 0: the last layer's gradient reaches the last row only)
    assert ra.maps[0][~banned & ~torch.ones_like(banned).tril()].abs().sum() > 0
    patterns = attention_patterns(model, seg)
    causal = attention_patterns(model, seg, mask="causal")
    assert (patterns[:, banned] == 0).all() and not torch.allclose(patterns, causal, atol=1e-4)
    _, own = model.run_with_cache(seg.tokens, attention_mask=seg.valid.long())
    assert torch.equal(causal[1], own["blocks.1.attn.hook_pattern"])
    assert_clean(model)


def test_fine_tuning_goes_through_the_mask():
    """answer_loss and its weight gradients = the reference's; mas_finetune's first loss is that loss (one batch),
    it changes the weights, and preserving_weights undoes it exactly."""
    model = hooked("gpt2_ln")
    seg = batch("right")
    seg = S.Segments(seg.tokens, seg.segment_ids, seg.valid, seg.valid & (seg.segment_ids < 0) &
                     (torch.arange(9) > 0))
    params = [p for p in model.parameters()]
    with torch.enable_grad():
        got = answer_loss(model, seg)
        got_grads = torch.autograd.grad(got, params, allow_unused=True)
        logits = reference_logits(model, seg, grad=True)
        nll = -logits[:, :-1].log_softmax(-1).gather(-1, seg.tokens[:, 1:, None])[..., 0]
        ref = nll[seg.target[:, 1:]].mean()
        ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    assert_close_fp32(got, ref, n_terms=MODEL_TERMS)
    with torch.no_grad():
        plain = reference_logits(model, seg, pairwise_mask(seg.causal().segment_ids, seg.valid))
        causal = -plain[:, :-1].log_softmax(-1).gather(-1, seg.tokens[:, 1:, None])[..., 0][seg.target[:, 1:]].mean()
        assert_close_fp32(answer_loss(model, seg, mask="causal"), causal, n_terms=MODEL_TERMS)
    assert abs(float(causal - ref.detach())) > 1e-3  # the masks really differ
    first = seg.target.long().argmax(-1)
    hits = (logits.detach()[torch.arange(2), first - 1].argmax(-1) == seg.tokens[torch.arange(2), first]).float()
    assert answer_accuracy(model, seg) == float(hits.mean())
    for (n, _), g, r in zip(model.named_parameters(), got_grads, ref_grads):
        assert (g is None) == (r is None), n
        if g is not None:
            assert_close_fp32(g, r, n_terms=MODEL_TERMS, what=n)
    before = [p.detach().clone() for p in params]
    with preserving_weights(model):
        res = mas_finetune(model, seg, epochs=1, batch_size=2, lr=1e-2, progress=False)
        assert any(not torch.equal(p, b) for p, b in zip(params, before))
    assert_close_fp32(res.losses[0], ref, n_terms=MODEL_TERMS)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not model.training
    assert_clean(model)
    with pytest.raises(tlb.errors.TLBackwardError, match="lora"):
        mas_finetune(model, seg, lora=True, progress=False)


def test_nothing_is_left_behind_also_after_exceptions():
    model = hooked("llama_gqa_rotary_gated")
    seg = batch("left")
    with torch.no_grad():
        before = model(seg.tokens, attention_mask=seg.valid.long())
        plain = model(seg.tokens)
        with segment_mask(model, seg):
            masked = model(seg.tokens)
        assert not torch.equal(masked, before)
        assert torch.equal(model(seg.tokens, attention_mask=seg.valid.long()), before)
        with pytest.raises(RuntimeError, match="boom"), segment_mask(model, seg):
            model(seg.tokens)
            raise RuntimeError("boom")
        assert_clean(model)
        with pytest.raises(tlb.errors.TLBackwardError), segment_mask(model, seg):
            model(seg.tokens[:, :-1])
        assert_clean(model)
        assert torch.equal(model(seg.tokens), plain)  # exactly causal again, also without a padding mask
    assert not model.training


def test_bad_inputs_raise_instead_of_using_a_wrong_mask():
    model = hooked("llama_gqa_rotary_gated")
    seg = batch("left")
    err = tlb.errors.TLBackwardError
    with torch.no_grad(), segment_mask(model, seg):
        with pytest.raises(err, match="differ from the segments"):
            model(seg.tokens[:, :-1])
        other = seg.tokens.clone()
        other[0, 1] = (other[0, 1] + 1) % BASE["d_vocab"]
        with pytest.raises(err, match="differ from the segments"):
            model(other)
        with pytest.raises(err, match="differ from the segments"):
            model.forward(other, attention_mask=seg.valid.long())  # no pre-hook: caught at the embedding
        with pytest.raises(err, match="conflicts"):
            model(seg.tokens, attention_mask=torch.ones_like(seg.tokens))
        with pytest.raises(err, match="no attention_mask"):
            model.forward(seg.tokens)  # would count pads as positions
        model(seg.tokens, attention_mask=seg.valid.long())  # the segments' own padding mask is fine
        if TL_MAJOR >= 3:  # TransformerLens 2.x's generate asserts a tokenizer before any forward
            with pytest.raises(err, match="no attention_mask|mas_generate|differ from the segments"):
                model.generate(seg.tokens, max_new_tokens=3, do_sample=False, use_past_kv_cache=True,
                               stop_at_eos=False, verbose=False)
        with pytest.raises(err, match="nested"), segment_mask(model, seg):
            pass
        with pytest.raises(err, match="already active"):
            mas_generate(model, seg, max_new_tokens=2)
    assert_clean(model)
    with pytest.raises(err, match="Segments"), segment_mask(model, seg.tokens):
        pass
    with pytest.raises(err, match="n_ctx"), segment_mask(model, S.from_ids(torch.zeros(1, 21, dtype=torch.long),
                                                                           torch.full((1, 21), -1))):
        pass
    with pytest.raises(err, match="max_new_tokens"):
        mas_generate(model, seg, max_new_tokens=0)
    with pytest.raises(err, match="causal attention"), segment_mask(hooked("gpt2_ln", attention_dir="bidirectional"),
                                                                    seg):
        pass
    alibi = hooked(**ALIBI)
    with pytest.raises(err, match="left padding"):
        mas_generate(alibi, batch("right"), max_new_tokens=2)
    mas_generate(alibi, batch("left"), max_new_tokens=2)
    assert_clean(model)
    assert_clean(alibi)


def test_another_thread_waits_for_the_block_and_sees_the_causal_model():
    model = hooked("gpt2_ln")
    seg = batch(None)
    with torch.no_grad():
        causal = model(seg.tokens)
    seen = {}

    def other():
        with model_lock(model), torch.no_grad():
            seen["logits"] = model(seg.tokens)

    with segment_mask(model, seg):
        thread = threading.Thread(target=other)
        thread.start()
        deadline = time.monotonic() + 10
        while lock_of(model).waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lock_of(model).waiting == 1 and "logits" not in seen  # blocked while the mask is on
    thread.join(10)
    assert torch.equal(seen["logits"], causal)
    assert_clean(model)
