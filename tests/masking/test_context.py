"""segment_mask: the mask reaches every forward, matches independent computations, and leaves no trace."""

import pytest
import torch
import transformers

from tl_backward.core.capture import capture
from tl_backward.masking import segment_mask
from tl_backward.masking import segments as S
from tl_backward.zoo.tiny import tiny_hf_model
from tests.tolerance import MODEL_TERMS, assert_close_fp32

from .helpers import pairwise_mask

PROMPTS = [["the cat sat on the mat", "where is the cat ?"], ["big dog", "red", "what is it"]]
ANSWERS = ["A : mat", "A : dog ."]
FIXTURE_ARGS = {"gpt2": dict(seed=0), "neox": dict(seed=1), "llama": dict(seed=2, n_heads=4, n_kv_heads=2)}


def family(model):
    hf = getattr(model, "original_model", None)  # a HookedTransformer records its HF architecture instead
    arch = type(hf).__name__ if hf is not None else model.cfg.original_architecture
    return {"GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "neox", "LlamaForCausalLM": "llama"}[arch]


def batch(model, side="right"):
    return S.from_blocks(model, PROMPTS, ANSWERS, padding_side=side)


def test_patterns_put_zero_mass_on_disallowed_entries(model):
    seg = batch(model)
    with segment_mask(model, seg):
        _, cache = model.run_with_cache(seg.tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_attn_scores")))
    keep = pairwise_mask(seg.segment_ids, seg.valid)  # [b, 1, q, k]
    rows = seg.valid[:, None, :, None]  # valid query rows
    for layer in range(model.cfg.n_layers):
        pat = cache[f"blocks.{layer}.attn.hook_pattern"]
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        allowed, banned = (keep & rows).expand_as(pat), (~keep & rows).expand_as(pat)
        assert (pat[banned] == 0).all()
        assert (pat[allowed] > 0).all()
        sums = pat.sum(-1)[rows[..., 0].expand(pat.shape[:3])]
        assert_close_fp32(sums, torch.ones_like(sums), n_terms=pat.shape[-1])  # Σ over key_pos
        assert (scores[banned] <= torch.finfo(scores.dtype).min).all()  # the bridge's finfo.min, HT's -inf
        assert (scores[allowed] > torch.finfo(scores.dtype).min / 2).all()
    # Block 0 really sees forward: the first real token attends to the end of its block.
    assert (cache["blocks.0.attn.hook_pattern"][0, :, 0, 1:7] > 0).all()


def test_logits_equal_an_unbridged_hf_model_with_the_pairwise_mask(model):
    if family(model) == "gpt2" and int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x's GPT-2 attention ANDs every 4-D mask with its causal bias buffer (measured: "
                    "an all-zero additive mask leaves its logits causal), so this HF reference cannot lift causality")
    hf = tiny_hf_model(family(model), **FIXTURE_ARGS[family(model)])
    seg = batch(model, "left")
    keep = pairwise_mask(seg.segment_ids, seg.valid)
    # An additive float mask: unambiguous for HF (its GPT-2 treats 4-D *bool* masks differently).
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        assert_close_fp32(hf(seg.tokens[:1, 4:]).logits, model(seg.tokens[:1, 4:]), n_terms=MODEL_TERMS)  # same weights
        ref = hf(seg.tokens, attention_mask=additive, position_ids=seg.position_ids).logits
        with segment_mask(model, seg):
            got = model(seg.tokens)
    assert_close_fp32(got[seg.valid], ref[seg.valid], n_terms=MODEL_TERMS)  # TL vs plain HF forward


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_attention_output_equals_manual_masked_softmax(fam, request):
    """z = softmax(q·kᵀ/s with the pairwise mask)·v, from the cached q, k (post-RoPE), v."""
    model = request.getfixturevalue(f"{fam}_model")
    seg = batch(model)
    qk = ("hook_rot_q", "hook_rot_k") if fam == "llama" else ("hook_q", "hook_k")
    names = [f"blocks.1.attn.{n}" for n in (*qk, "hook_v", "hook_z")]
    with segment_mask(model, seg):
        _, cache = model.run_with_cache(seg.tokens, names_filter=names)
    q, k, v, z = (cache[n] for n in names)
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scale = 1.0 / model.blocks[1].attn.original_component.scaling
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / scale
    keep = pairwise_mask(seg.segment_ids, seg.valid)
    pattern = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    # q·k over d_head, then softmax and P·v over key_pos
    assert_close_fp32(z[seg.valid], ref[seg.valid], n_terms=q.shape[-1] + k.shape[1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_unpadded_prompts(model, side):
    seg = batch(model, side)
    with torch.no_grad(), segment_mask(model, seg):
        padded = model(seg.tokens)
    for b in range(2):
        single = S.from_blocks(model, PROMPTS[b], ANSWERS[b])
        with torch.no_grad(), segment_mask(model, single):
            alone = model(single.tokens)
        assert_close_fp32(padded[b][seg.valid[b]], alone[0], n_terms=MODEL_TERMS, what=f"row {b}")  # padded vs alone


def test_changes_propagate_only_where_the_mask_allows(model):
    base = S.from_blocks(model, ["the cat sat on the mat", "where is the cat ?"], "A : mat")
    n0 = base.spans()[0][1]  # block 0 = BOS + 6 words
    n1 = base.spans()[1][1]

    def run(tokens):
        seg = S.from_ids(tokens, base.segment_ids, target=base.target)
        with torch.no_grad(), segment_mask(model, seg):
            return model(tokens)[0]

    ref = run(base.tokens)
    other = model.tokenizer.convert_tokens_to_ids("dog")
    late_block0 = base.tokens.clone()
    late_block0[0, n0 - 1] = other
    out = run(late_block0)
    assert (out[: n0 - 1] - ref[: n0 - 1]).abs().max() > 1e-4  # earlier block-0 tokens see it
    block1 = base.tokens.clone()
    block1[0, n1 - 1] = other
    out = run(block1)
    assert torch.equal(out[: n0], ref[: n0])  # block 0 never sees block 1
    assert (out[n0 : n1 - 1] - ref[n0 : n1 - 1]).abs().max() > 1e-4  # but block 1 does
    tail = base.tokens.clone()
    tail[0, -1] = other
    out = run(tail)
    assert torch.equal(out[:-1], ref[:-1])  # the causal tail is invisible to everything before


def test_all_length_one_segments_equal_causal(model):
    tokens = batch(model).tokens[:1]
    singles = S.from_ids(tokens, torch.arange(tokens.shape[1]))
    with torch.no_grad():
        causal = model(tokens)
        with segment_mask(model, singles):
            mas = model(tokens)
    assert_close_fp32(mas, causal, n_terms=MODEL_TERMS)  # the same mask, applied by another route


@pytest.mark.bridge_only("counts the HF module's pre-hooks; a HookedTransformer's restore is checked in tests/masking/test_hooked_mas.py")
def test_exit_restores_exact_causal_behaviour_also_after_errors(model):
    seg = batch(model)
    hf = model.original_model
    n_hooks = len(hf._forward_pre_hooks)
    with torch.no_grad():
        before = model(seg.tokens)
        with segment_mask(model, seg):
            masked = model(seg.tokens)
        assert not torch.equal(masked, before)
        assert torch.equal(model(seg.tokens), before)
        with pytest.raises(RuntimeError, match="boom"), segment_mask(model, seg):
            model(seg.tokens)
            raise RuntimeError("boom")
        assert len(hf._forward_pre_hooks) == n_hooks
        assert torch.equal(model(seg.tokens), before)
        with pytest.raises(ValueError), segment_mask(model, seg):
            model(seg.tokens[:, :-1])
        assert torch.equal(model(seg.tokens), before)
    assert len(hf._forward_pre_hooks) == n_hooks and not model.training


def test_foreign_inputs_raise_instead_of_using_a_wrong_mask(model):
    seg = batch(model)
    with torch.no_grad(), segment_mask(model, seg):
        with pytest.raises(ValueError, match="differ from the segments"):
            model(seg.tokens[:, :-1])
        other = seg.tokens.clone()
        other[0, 1] = (other[0, 1] + 1) % model.cfg.d_vocab
        with pytest.raises(ValueError, match="differ from the segments"):
            model(other)
        with pytest.raises(ValueError, match="conflicts"):
            model(seg.tokens, attention_mask=torch.ones(1, 1, *seg.tokens.shape[1:] * 2, dtype=torch.bool))
        model(seg.tokens, attention_mask=seg.valid.long())  # the segments' own padding mask is fine
        with pytest.raises(ValueError, match="nested"), segment_mask(model, seg):
            pass
    with pytest.raises(TypeError, match="Segments"), segment_mask(model, seg.tokens):
        pass


@pytest.mark.bridge_only("its reference passes the HF-level 4-D mask and position_ids through the bridge; the HookedTransformer path is checked against its own reference in tests/masking/test_hooked_mas.py")
def test_capture_under_segment_mask_matches_explicit_autograd(model):
    seg = S.from_blocks(model, ["the cat sat on the mat", "where is the cat ?"], "A :")
    target = model.tokenizer.convert_tokens_to_ids("mat")

    def metric(logits, tokens):
        return -logits[0, -1].log_softmax(-1)[target]

    name = "blocks.0.hook_resid_pre"
    with segment_mask(model, seg):
        cache = capture(model, seg.tokens, metric, names=[name])
    causal = capture(model, seg.tokens, metric, names=[name])

    leaf = {}

    def make_leaf(x, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    with model.hooks(fwd_hooks=[(name, make_leaf)]):
        logits = model(seg.tokens, attention_mask=seg.mask())
        value = metric(logits, seg.tokens)
        (grad,) = torch.autograd.grad(value, [leaf["x"]])
    assert_close_fp32(cache.metric, value.detach(), n_terms=MODEL_TERMS)  # capture vs explicit autograd
    assert_close_fp32(cache[name + "_grad"], grad, n_terms=MODEL_TERMS)
    assert not torch.allclose(causal[name + "_grad"], grad, atol=1e-4)  # MAS really changed it
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.bridge_only("its reference passes the HF-level 4-D mask through the bridge; on a HookedTransformer: tests/masking/test_hooked_mas.py")
def test_reversed_attention_and_backward_lens_see_the_mas_mask(model):
    from tl_backward.attention import reversed_attention
    from tl_backward.lens.backward_lens import backward_lens

    seg = S.from_blocks(model, ["the cat sat on the mat", "where is the cat ?", "A :"])
    target = model.tokenizer.convert_tokens_to_ids("mat")
    with segment_mask(model, seg):
        ra = reversed_attention(model, seg.tokens, target=target)
        lens = backward_lens(model, seg.tokens, target, layers=0, top_k=3)
    causal = reversed_attention(model, seg.tokens, target=target)
    with torch.no_grad():
        logits = model(seg.tokens, attention_mask=seg.mask())[0, -1]
    keep = pairwise_mask(seg.segment_ids, seg.valid)[0, 0]
    future = keep & ~torch.ones_like(keep).tril()  # entries only MAS allows
    assert future.any()
    assert (ra.maps[:, 0][..., ~keep] == 0).all()  # no gradient through banned entries
    assert (ra.patterns[:, 0][..., future] > 0).all() and ra.maps[:, 0][..., future].abs().sum() > 0
    assert (causal.maps[:, 0][..., future] == 0).all()
    assert_close_fp32(ra.metric, -logits.log_softmax(-1)[target], n_terms=MODEL_TERMS)  # two forward passes
    assert int(lens.pred_ids[0]) == int(logits.argmax())
