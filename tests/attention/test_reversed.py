"""Reversed Attention against independent computations (plain-HF autograd, pattern-gradient route,
∂L/∂Q = RA·K) and the definition's properties (spec reversed_attention.md §1, §8)."""

import pytest
import torch

from tests.conftest import SPECS, build
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.attention import reversed_attention, reversed_attention_from
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture
from tl_backward.core.metrics import target_nll
from tl_backward.zoo.tiny import tiny_hf_model, tiny_model

PROMPTS = ["the cat sat on the mat and the dog", "paris is the capital of", "one two three"]
TARGETS = [" ran", " france", " four"]


def hf_reference(family, spec, tokens, last, targets):
    """RA from a fresh plain-HF model: ∂L/∂P by autograd on the eager attention probabilities that
    ``output_attentions=True`` returns (the very tensors multiplied with V in eval mode), then the
    softmax-backward formula and ÷ s, with s computed here from the config, not by tl_backward."""
    hf = tiny_hf_model(family, **spec)
    with torch.enable_grad():
        out = hf(tokens, output_attentions=True)
        rows = torch.arange(len(tokens))
        loss = -torch.log_softmax(out.logits[rows, last].float(), -1)[rows, targets].sum()
        # autograd.grad raises if a probability tensor were not on the path to the loss.
        dps = torch.autograd.grad(loss, out.attentions)
    cfg = hf.config
    n_heads = getattr(cfg, "n_head", None) or cfg.num_attention_heads
    d_head = (getattr(cfg, "n_embd", None) or cfg.hidden_size) // n_heads
    maps = []
    for l, (p, dp) in enumerate(zip(out.attentions, dps)):
        s = d_head ** 0.5 * ((l + 1) if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) else 1)
        p, dp = p.detach(), dp.detach()
        maps.append(p * (dp - (p * dp).sum(-1, keepdim=True)) / s)
    for p in hf.parameters():
        assert p.grad is None
    return torch.stack(maps), torch.stack([a.detach() for a in out.attentions]), loss.detach()


def _single_row_ids(model, prompt):
    return get_adapter(model).tokenize(prompt, prepend_bos=True).tokens


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_matches_hf_autograd(family, request):
    model = request.getfixturevalue(f"{family}_model")
    ad = get_adapter(model)
    tok = [int(ad.target_tokens(t)[0]) for t in TARGETS]
    for prompt, t in zip(PROMPTS, tok):
        ids = _single_row_ids(model, prompt)
        ra = reversed_attention(model, ids, t)
        ref, pat, loss = hf_reference(family, SPECS[family], ids, torch.tensor([ids.shape[1] - 1]), torch.tensor([t]))
        assert ra.maps.shape == (ad.n_layers, 1, ad.n_heads, ids.shape[1], ids.shape[1])
        scale = float(ref.abs().max())
        assert scale > 1e-5  # a real, non-trivial map
        # TL vs plain HF, each a whole forward + backward in its own order
        assert_close_fp32(ra.maps, ref, n_terms=MODEL_TERMS, what="maps")
        assert_close_fp32(ra.patterns, pat, n_terms=MODEL_TERMS, what="patterns")
        assert_close_fp32(ra.metric, loss, n_terms=MODEL_TERMS, what="metric")
    assert_no_hooks(model)
    assert_untouched(model)


def test_inverse_layer_scaling_matches_hf():
    spec = dict(seed=3, n_heads=4, scale_attn_by_inverse_layer_idx=True)
    model = tiny_model("gpt2", **spec)
    ad = get_adapter(model)
    assert ad.attn_scale(1) == pytest.approx(2 * ad.attn_scale(0))
    ids = _single_row_ids(model, PROMPTS[0])
    t = int(ad.target_tokens(TARGETS[0])[0])
    ra = reversed_attention(model, ids, t)
    ref, _, _ = hf_reference("gpt2", spec, ids, torch.tensor([ids.shape[1] - 1]), torch.tensor([t]))
    assert_close_fp32(ra.maps, ref, n_terms=MODEL_TERMS, what="maps")  # TL vs plain HF


def test_scores_route_equals_pattern_route(model):
    """RA (÷ s of the scores gradient) == softmax-backward formula on grad(hook_pattern) ÷ s."""
    ad = get_adapter(model)
    ra = reversed_attention(model, PROMPTS, TARGETS, prepend_bos=True)
    names = [ad.hook_name("pattern", l) for l in range(ad.n_layers)]
    cache = capture(model, PROMPTS, target_nll(TARGETS), names=names, prepend_bos=True)
    keep = cache.mask[:, None, :, None] & cache.mask[:, None, None, :]
    for l, name in enumerate(names):
        p, dp = cache[name], cache.grad(name)
        via_pattern = reversed_attention_from(p, dp, ad.attn_scale(l), grad_of="pattern", keep=keep)
        # two runs (RA's, capture's); the softmax backward's terms p·dP can cancel, so scale by them
        assert_close_fp32(ra.maps[l], via_pattern, n_terms=MODEL_TERMS, what=f"L{l}",
                          scale=float((p * dp).abs().max()) / ad.attn_scale(l))
        # the recomputed patterns are the model's hook_pattern (padding rows/cols zeroed), another forward
        assert_close_fp32(ra.patterns[l], p * keep, n_terms=MODEL_TERMS, what=f"L{l} patterns")
        # the pattern gradient leaks onto masked entries; RA must not
        future = torch.ones_like(p, dtype=torch.bool).triu(1)
        assert float(dp[future].abs().max()) > 0
        assert float(ra.maps[l][future].abs().max()) == 0.0


def test_definition_properties(model):
    ra = reversed_attention(model, PROMPTS, TARGETS, prepend_bos=True)
    maps, pats = ra.maps, ra.patterns
    # 1. rows sum to zero
    # each row sum is an fp32 sum of key_pos terms no larger than max|maps|
    assert_close_fp32(maps.sum(-1), torch.zeros(maps.shape[:-1]), n_terms=maps.shape[-1], scale=float(maps.abs().max()))
    # 2. exactly zero where P is zero: the future (upper triangle) and padding
    assert float(maps.triu(1).abs().max()) == 0.0
    assert bool((maps[pats == 0] == 0).all())
    pad = ~ra.mask
    for b in range(len(PROMPTS)):
        assert pad[b].any() or b == 0  # the longest prompt has no padding, the others do
        assert bool((maps[:, b][..., pad[b], :] == 0).all()) and bool((maps[:, b][..., :, pad[b]] == 0).all())
        assert bool((pats[:, b][..., pad[b], :] == 0).all()) and bool((pats[:, b][..., :, pad[b]] == 0).all())
    # 4. in the last layer only the loss rows are non-zero
    last_layer = maps[-1]
    for b, pos in enumerate(ra.last.tolist()):
        row_norms = last_layer[b].abs().sum((0, 2))  # per query position
        assert float(row_norms[pos]) > 0
        assert float(row_norms[torch.arange(len(row_norms)) != pos].max()) == 0.0
    # every layer's loss row is non-zero somewhere
    assert all(float(maps[l].abs().max()) > 0 for l in range(maps.shape[0]))


def test_batch_equals_singles(model):
    batched = reversed_attention(model, PROMPTS, TARGETS, prepend_bos=True)
    total = 0.0
    for b, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        single = reversed_attention(model, prompt, target, prepend_bos=True)
        n = single.maps.shape[-1]
        assert int(batched.mask[b].sum()) == n
        # batched vs single rows: other accumulation orders through the whole model
        assert_close_fp32(batched.maps[:, b, :, :n, :n], single.maps[:, 0], n_terms=MODEL_TERMS, what=f"maps {b}")
        assert_close_fp32(batched.patterns[:, b, :, :n, :n], single.patterns[:, 0], n_terms=MODEL_TERMS)
        assert batched.str_tokens[b] == single.str_tokens[0]
        total += float(single.metric)
    assert float(batched.metric) == pytest.approx(total, rel=fp32_rtol(MODEL_TERMS))  # batch losses are summed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_query_gradient_is_ra_times_keys(family, request):
    """∂L/∂Q = RA·K (and ∂L/∂K = RAᵀ·Q) per head; Llama: rotated q/k, GQA keys shared."""
    model = request.getfixturevalue(f"{family}_model")
    ad = get_adapter(model)
    ra = reversed_attention(model, PROMPTS[0], TARGETS[0], prepend_bos=True)
    kind_q, kind_k = ("rot_q", "rot_k") if ad.rot_hooks else ("q", "k")
    names = [ad.hook_name(k, l) for l in range(ad.n_layers) for k in (kind_q, kind_k)]
    cache = capture(model, PROMPTS[0], target_nll(TARGETS[0]), names=names, prepend_bos=True)
    for l in range(ad.n_layers):
        q, k = cache[ad.hook_name(kind_q, l)], cache[ad.hook_name(kind_k, l)]  # [b, p, head|kv, d]
        dq, dk = cache.grad(ad.hook_name(kind_q, l)), cache.grad(ad.hook_name(kind_k, l))
        rep = ad.n_heads // ad.n_kv_heads
        k_full = k.repeat_interleave(rep, dim=2)
        pred_dq = torch.einsum("bhqk,bkhd->bqhd", ra.maps[l], k_full)
        # RA and the q/k gradients come from two separate runs, each a whole forward + backward
        assert_close_fp32(dq, pred_dq, n_terms=MODEL_TERMS, what=f"dq L{l}")
        pred_dk = torch.einsum("bhqk,bqhd->bkhd", ra.maps[l], q)
        pred_dk = pred_dk.reshape(*pred_dk.shape[:2], ad.n_kv_heads, rep, -1).sum(3)  # GQA: sum shared heads
        assert_close_fp32(dk, pred_dk, n_terms=MODEL_TERMS, what=f"dk L{l}")


def test_appended_target_gives_zero_row_and_column(gpt2_model):
    """Running prompt+target with the loss only at the last prompt position (the reference's setup)
    gives the prompt-only maps plus a zero row and column for the appended token."""
    ad = get_adapter(gpt2_model)
    ids = _single_row_ids(gpt2_model, PROMPTS[1])
    t = int(ad.target_tokens(TARGETS[1])[0])
    plain = reversed_attention(gpt2_model, ids, t)
    longer = torch.cat([ids, torch.tensor([[t]])], dim=1)
    T = ids.shape[1]

    def nll_at_prompt_end(logits, tokens):
        return -torch.log_softmax(logits[:, T - 1].float(), -1)[:, t].sum()

    ext = reversed_attention(gpt2_model, longer, metric=nll_at_prompt_end)
    assert_close_fp32(ext.maps[..., :T, :T], plain.maps, n_terms=MODEL_TERMS)  # one more position: other orders
    assert float(ext.maps[..., T, :].abs().max()) == 0.0
    assert float(ext.maps[..., :, T].abs().max()) == 0.0


def test_layers_subset_and_order(llama_model):
    full = reversed_attention(llama_model, PROMPTS[0], TARGETS[0], prepend_bos=True)
    part = reversed_attention(llama_model, PROMPTS[0], TARGETS[0], layers=[1, 0], prepend_bos=True)
    assert part.layers == (1, 0)
    assert_close_fp32(part.maps[0], full.maps[1], n_terms=MODEL_TERMS)  # two runs of the model
    assert_close_fp32(part.maps[1], full.maps[0], n_terms=MODEL_TERMS)
    assert part.layer_index(0) == 1
    assert part.map(0, 2).shape == (full.maps.shape[-1],) * 2


def test_ranking_helpers(gpt2_model):
    ra = reversed_attention(gpt2_model, PROMPTS, TARGETS, prepend_bos=True)
    norms = ra.head_norms()
    per = ra.head_norms(per_example=True)
    assert norms.shape == (2, 4) and per.shape == (2, 3, 4)
    manual = ra.maps[1, 2, 3].pow(2).sum().sqrt()
    # a sum of T·T squares
    assert float(per[1, 2, 3]) == pytest.approx(float(manual), rel=fp32_rtol(ra.maps[1, 2, 3].numel()))
    torch.testing.assert_close(norms, per.mean(1), rtol=0, atol=0)  # the same mean of the same tensor
    top = ra.top_heads(3)
    assert [round(v, 7) for _, _, v in top] == sorted([round(v, 7) for _, _, v in top], reverse=True)
    l, h, v = top[0]
    # the same float32 numbers, read twice
    assert v == pytest.approx(float(norms.max()), rel=1e-6) and float(norms[ra.layer_index(l), h]) == pytest.approx(v)
    assert ra.head_norms("forward").shape == (2, 4)


@pytest.mark.slow
def test_compatibility_mode_gives_same_ra():
    raw = build("gpt2")
    compat = build("gpt2")
    compat.enable_compatibility_mode()
    a = reversed_attention(raw, PROMPTS, TARGETS, prepend_bos=True)
    b = reversed_attention(compat, PROMPTS, TARGETS, prepend_bos=True)
    assert_close_fp32(a.maps, b.maps, n_terms=MODEL_TERMS)  # compatibility mode folds weights: other roundings


def test_bad_input(gpt2_model):
    with pytest.raises(ValueError, match="exactly one"):
        reversed_attention(gpt2_model, "the cat", " dog", metric=lambda lg, t: lg.sum())
    with pytest.raises(ValueError, match="exactly one"):
        reversed_attention(gpt2_model, "the cat")
    with pytest.raises(ValueError, match="out of range"):
        reversed_attention(gpt2_model, "the cat", " dog", layers=[5])
    with pytest.raises(ValueError, match="same shape"):
        reversed_attention_from(torch.rand(3, 3), torch.rand(3, 4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        reversed_attention_from(torch.rand(3, 3), torch.rand(3, 3), 0.0)
    ra = reversed_attention(gpt2_model, "the cat", " dog", layers=[1])
    with pytest.raises(ValueError, match="not computed"):
        ra.layer_index(0)
    with pytest.raises(ValueError, match="which"):
        ra.head_norms("backward")
    assert_no_hooks(gpt2_model)
    assert_untouched(gpt2_model)


def test_layer_off_the_loss_path_is_exactly_zero(gpt2_model):
    """A layer whose scores do not reach the loss (its attention output detached by an outer hook)
    gets no gradient callback: its map must be exactly 0, not leftover buffer memory, and the
    other layer's map is unchanged (its path to the loss never went through layer 0's output)."""
    ad = get_adapter(gpt2_model)
    plain = reversed_attention(gpt2_model, PROMPTS, TARGETS, prepend_bos=True)
    detach = [(ad.hook_name("z", 0), lambda z, hook: z.detach())]
    for _ in range(3):  # fresh buffers each time: garbage would show up in at least one call
        with gpt2_model.hooks(fwd_hooks=detach):
            cut = reversed_attention(gpt2_model, PROMPTS, TARGETS, prepend_bos=True)
        assert bool((cut.maps[0] == 0).all())
        assert float(cut.patterns[0].abs().max()) > 0  # the forward pattern is still reported
        assert_close_fp32(cut.maps[1], plain.maps[1], n_terms=MODEL_TERMS, what="layer 1")  # two runs
    assert_no_hooks(gpt2_model)


def test_patterns_are_the_patched_ones_under_patch_attention(gpt2_model):
    """Inside patch_attention the run (and thus the returned patterns) is the patched model's; the
    outer patch hooks survive the inner analysis and are removed at exit."""
    from tl_backward.attention import patch_attention

    base = reversed_attention(gpt2_model, PROMPTS[1], TARGETS[1], prepend_bos=True)
    with patch_attention(gpt2_model, base, eta=-0.5):
        inner = reversed_attention(gpt2_model, PROMPTS[1], TARGETS[1], prepend_bos=True)
        again = reversed_attention(gpt2_model, PROMPTS[1], TARGETS[1], prepend_bos=True)
    assert_close_fp32(inner.patterns, base.patterns - 0.5 * base.maps, n_terms=MODEL_TERMS)  # two runs
    assert_close_fp32(again.maps, inner.maps, n_terms=MODEL_TERMS)  # the patch was still active the second time
    assert float(inner.metric) < float(base.metric)  # descent direction (spec §1.6)
    assert_no_hooks(gpt2_model)
