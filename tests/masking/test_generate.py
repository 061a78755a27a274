"""mas_generate: cached decoding equals a no-cache MAS-then-causal reference; length-1 blocks are causal."""

import pytest
import torch

from tl_backward.masking import mas_generate
from tl_backward.masking import segments as S
from tests.tolerance import MODEL_TERMS, assert_close_fp32

from .helpers import greedy_causal, no_cache_generate

PROMPTS = [["the cat sat on", "where is the cat ?"], ["big dog", "red", "what is it"]]
ANSWERS = ["A :", "A"]


@pytest.mark.bridge_only("its no-cache reference passes the HF-level 4-D mask and position_ids; on a HookedTransformer: tests/masking/test_hooked_mas.py")
@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_generation_equals_no_cache_reference(model, side):
    seg = S.from_blocks(model, PROMPTS, ANSWERS, padding_side=side)
    out = mas_generate(model, seg, max_new_tokens=8, eos_token_id=None)
    assert out.new_tokens.shape == (2, 8) and out.new_valid.all()
    assert torch.equal(out.new_tokens, no_cache_generate(model, seg, 8))


def test_left_and_right_padding_generate_the_same(model):
    left = mas_generate(model, S.from_blocks(model, PROMPTS, ANSWERS, padding_side="left"),
                        max_new_tokens=6, eos_token_id=None)
    right = mas_generate(model, S.from_blocks(model, PROMPTS, ANSWERS, padding_side="right"),
                         max_new_tokens=6, eos_token_id=None)
    single = mas_generate(model, S.from_blocks(model, PROMPTS[1], ANSWERS[1]), max_new_tokens=6, eos_token_id=None)
    assert torch.equal(left.new_tokens, right.new_tokens)
    assert torch.equal(left.new_tokens[1], single.new_tokens[0])


def test_all_length_one_segments_generate_like_ordinary_causal_decoding(model):
    tokens = S.from_blocks(model, PROMPTS[0], ANSWERS[0]).tokens
    singles = S.from_ids(tokens, torch.arange(tokens.shape[1]))
    out = mas_generate(model, singles, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out.new_tokens, greedy_causal(model, tokens, 8))


@pytest.mark.bridge_only("its no-cache reference passes the HF-level 4-D mask and position_ids; on a HookedTransformer: tests/masking/test_hooked_mas.py")
def test_mas_prefill_changes_the_continuation_somewhere(model):
    seg = S.from_blocks(model, PROMPTS, ANSWERS)
    with torch.no_grad():
        mas = model(seg.tokens, attention_mask=seg.mask())
        causal = model(seg.tokens, attention_mask=seg.causal().mask())
    assert not torch.allclose(mas, causal, atol=1e-4)  # an effect (measured 0.27) far above fp32 noise


def test_eos_stops_a_row_and_pads_after_it(model):
    seg = S.from_blocks(model, PROMPTS, ANSWERS)
    free = mas_generate(model, seg, max_new_tokens=6, eos_token_id=None)
    eos = int(free.new_tokens[0, 1])
    out = mas_generate(model, seg, max_new_tokens=6, eos_token_id=eos)
    stop = int((free.new_tokens[0] == eos).nonzero()[0])
    assert out.new_tokens[0, : stop + 1].tolist() == free.new_tokens[0, : stop + 1].tolist()
    assert out.new_valid[0].tolist() == [True] * (stop + 1) + [False] * (out.new_tokens.shape[1] - stop - 1)
    assert (out.new_tokens[0, stop + 1 :] == model.tokenizer.pad_token_id).all()
    assert len(out.text(model)) == 2 and out.full.tokens.shape[1] == seg.tokens.shape[1] + out.new_tokens.shape[1]


def test_sampling_is_seeded_and_leaves_global_rng_alone(model):
    seg = S.from_blocks(model, PROMPTS, ANSWERS)
    state = torch.random.get_rng_state()
    a = mas_generate(model, seg, max_new_tokens=6, temperature=1.5, seed=3, eos_token_id=None)
    b = mas_generate(model, seg, max_new_tokens=6, temperature=1.5, seed=3, eos_token_id=None)
    c = mas_generate(model, seg, max_new_tokens=6, temperature=1.5, seed=4, top_k=5, eos_token_id=None)
    assert torch.equal(a.new_tokens, b.new_tokens) and c.new_tokens.shape == a.new_tokens.shape
    assert torch.equal(torch.random.get_rng_state(), state)


def test_generation_leaves_no_hooks_and_checks_arguments(model):
    seg = S.from_blocks(model, PROMPTS, ANSWERS)
    counts = [len(b.attn._forward_pre_hooks) for b in model.blocks]
    weights = [p.clone() for p in model.parameters()]
    mas_generate(model, seg, max_new_tokens=2)
    assert [len(b.attn._forward_pre_hooks) for b in model.blocks] == counts
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    with pytest.raises(ValueError, match="max_new_tokens"):
        mas_generate(model, seg, max_new_tokens=0)
    with pytest.raises(ValueError, match="n_ctx"):
        mas_generate(model, seg, max_new_tokens=model.cfg.n_ctx)
    with pytest.raises(ValueError, match="temperature"):
        mas_generate(model, seg, max_new_tokens=2, temperature=-1)
    with pytest.raises(TypeError, match="Segments"):
        mas_generate(model, seg.tokens, max_new_tokens=2)


@pytest.mark.bridge_only("reuses the HF module's KV cache across prompts (a bridge path); on a HookedTransformer: tests/masking/test_hooked_mas.py")
def test_system_block_kv_can_be_cached_and_reused(model):
    """Prefill block 0 alone, then the rest with the mask rows at absolute positions: same logits
    as one MAS prefill (block 0 never sees later tokens, so its K/V do not depend on them)."""
    from tl_backward.masking.generate import _kv_cache_shim

    seg = S.from_blocks(model, ["the cat sat on the mat", "where is the cat ?"], "A : mat")
    off = seg.spans()[0][1]
    rest = seg.tokens.shape[1] - off
    with torch.no_grad(), _kv_cache_shim(model):
        full = model(seg.tokens, attention_mask=seg.mask(), position_ids=seg.position_ids)
        head, cache = model(seg.tokens[:, :off], attention_mask=seg.mask()[:, :, :off, :off],
                            return_type="logits_and_cache")
        tail, _ = model(seg.tokens[:, off:], attention_mask=seg.mask(q_len=rest),
                        position_ids=seg.position_ids[:, off:], past_key_values=cache, return_type="logits_and_cache")
    # two cached calls vs one: other accumulation orders through the whole model
    assert_close_fp32(head, full[:, :off], n_terms=MODEL_TERMS, what="head")
    assert_close_fp32(tail, full[:, off:], n_terms=MODEL_TERMS, what="tail")


def test_bridge_generate_inside_segment_mask_is_refused(model):
    from tl_backward.masking import segment_mask

    seg = S.from_blocks(model, PROMPTS[0], ANSWERS[0])
    for cached in (True, False):
        with segment_mask(model, seg), pytest.raises(ValueError, match="mas_generate|differ from the segments"):
            model.generate(seg.tokens, max_new_tokens=3, do_sample=False, use_past_kv_cache=cached, verbose=False)
