"""Dataset aggregation (mean maps, alignment) and the streaming head ranking."""

import pytest
import torch

from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import MODEL_TERMS, assert_close_fp32, fp32_rtol
from tl_backward.attention import mean_over, rank_heads, reversed_attention
from tl_backward.attention.aggregate import MeanAccumulator
from tl_backward.core.adapter import get_adapter

SAME = ["the cat sat on the mat", "the dog ran to the city", "a big red dog is hot"]  # 6 words each
SAME_T = [" big", " cat", " cold"]
MIXED = ["the cat sat on the mat and", "the dog ran", "a big red dog is"]
MIXED_T = [" big", " cat", " cold"]


def test_exact_mean_is_the_elementwise_mean(gpt2_model):
    singles = [reversed_attention(gpt2_model, p, t, prepend_bos=True) for p, t in zip(SAME, SAME_T)]
    mean = mean_over(gpt2_model, SAME, SAME_T, batch_size=2, prepend_bos=True)
    assert mean.maps.shape[1] == 1 and mean.n_examples == 3 and mean.align == "exact"
    manual = torch.stack([s.maps[:, 0] for s in singles]).mean(0)
    # batches of 2 vs single rows: other accumulation orders through the whole model
    assert_close_fp32(mean.maps[:, 0], manual, n_terms=MODEL_TERMS, what="mean maps")
    manual_p = torch.stack([s.patterns[:, 0] for s in singles]).mean(0)
    assert_close_fp32(mean.patterns[:, 0], manual_p, n_terms=MODEL_TERMS, what="mean patterns")
    assert mean.str_tokens == singles[0].str_tokens
    assert float(mean.metric) == pytest.approx(sum(float(s.metric) for s in singles) / 3, rel=fp32_rtol(MODEL_TERMS))
    # the in-memory mean of one batch agrees with the streamed one
    batch = reversed_attention(gpt2_model, SAME, SAME_T, prepend_bos=True)
    assert_close_fp32(batch.mean().maps, mean.maps, n_terms=MODEL_TERMS, what="one batch vs streamed")
    # mean rows still sum to zero; the mean pattern's rows to one (key_pos terms, each a mean of 3)
    n_terms = 3 * mean.maps.shape[-1]
    assert_close_fp32(mean.maps.sum(-1), torch.zeros(mean.maps.shape[:-1]), n_terms=n_terms,
                      scale=float(mean.maps.abs().max()))
    assert_close_fp32(mean.patterns.sum(-1), torch.ones_like(mean.patterns.sum(-1)), n_terms=n_terms)


def test_exact_alignment_refuses_mixed_lengths(gpt2_model):
    with pytest.raises(ValueError, match="align='end'"):
        mean_over(gpt2_model, MIXED, MIXED_T, prepend_bos=True)
    ra = reversed_attention(gpt2_model, MIXED, MIXED_T, prepend_bos=True)
    with pytest.raises(ValueError, match="one token length"):
        ra.mean()
    with pytest.raises(ValueError, match="align must be"):
        ra.mean(align="start")


def test_end_alignment_counts_from_the_last_token(gpt2_model):
    singles = [reversed_attention(gpt2_model, p, t, prepend_bos=True) for p, t in zip(MIXED, MIXED_T)]
    n = min(s.maps.shape[-1] for s in singles)
    manual = torch.stack([s.maps[:, 0, :, -n:, -n:] for s in singles]).mean(0)
    # streamed in batches whose shortest prompt arrives last (the running sums get cropped)
    mean = mean_over(gpt2_model, MIXED, MIXED_T, batch_size=1, align="end", prepend_bos=True)
    assert mean.maps.shape[-1] == n
    assert_close_fp32(mean.maps[:, 0], manual, n_terms=MODEL_TERMS, what="mean maps")  # padded vs single rows
    assert mean.str_tokens[0] == singles[0].str_tokens[0][-n:]
    batch = reversed_attention(gpt2_model, MIXED, MIXED_T, prepend_bos=True).mean(align="end")
    assert_close_fp32(batch.maps, mean.maps, n_terms=MODEL_TERMS, what="one batch vs streamed")
    with pytest.raises(ValueError, match="already averaged"):
        acc = MeanAccumulator("end")
        acc.add(mean)


def test_rank_heads_streams_the_per_example_norms(llama_model):
    singles = [reversed_attention(llama_model, p, t, prepend_bos=True) for p, t in zip(MIXED, MIXED_T)]
    r_norms = torch.stack([s.head_norms() for s in singles])  # [example, layer, head]
    f_norms = torch.stack([s.head_norms("forward") for s in singles])
    for bs in (1, 2, 3):
        ranking = rank_heads(llama_model, MIXED, MIXED_T, batch_size=bs, prepend_bos=True, progress=False)
        assert ranking.n_examples == 3 and ranking.layers == (0, 1)
        # batches of bs vs single rows. A std moves by as much as the norms do, so its absolute
        # tolerance scales with the norms, not with the (smaller) std itself.
        assert_close_fp32(ranking.reversed_mean, r_norms.mean(0), n_terms=MODEL_TERMS, what="RA mean")
        assert_close_fp32(ranking.reversed_std, r_norms.std(0), n_terms=MODEL_TERMS, what="RA std",
                          scale=float(r_norms.abs().max()))
        assert_close_fp32(ranking.forward_mean, f_norms.mean(0), n_terms=MODEL_TERMS, what="forward mean")
        assert_close_fp32(ranking.forward_std, f_norms.std(0), n_terms=MODEL_TERMS, what="forward std",
                          scale=float(f_norms.abs().max()))
    # token-id targets, one per prompt, give the same ranking as strings
    ad = get_adapter(llama_model)
    ids = [int(ad.target_tokens(t)[0]) for t in MIXED_T]
    by_id = rank_heads(llama_model, MIXED, ids, batch_size=2, prepend_bos=True, progress=False)
    assert_close_fp32(by_id.reversed_mean, ranking.reversed_mean, n_terms=MODEL_TERMS)  # batches of 2 vs 3
    assert_no_hooks(llama_model)
    assert_untouched(llama_model)


def test_ranking_orders(gpt2_model):
    ranking = rank_heads(gpt2_model, SAME, SAME_T, batch_size=2, prepend_bos=True, progress=False)
    order = ranking.order()
    scores = [float(ranking.reversed_mean[l, h]) for l, h in order]
    assert scores == sorted(scores, reverse=True) and len(order) == 8
    assert ranking.order(descending=False) == order[::-1]
    fwd = ranking.order("forward")
    assert [float(ranking.forward_mean[l, h]) for l, h in fwd] == sorted(
        (float(v) for v in ranking.forward_mean.flatten()), reverse=True)
    rnd = ranking.order("random", seed=1)
    assert sorted(rnd) == sorted(order) and rnd == ranking.order("random", seed=1)
    assert ranking.order("random", seed=2) != rnd
    top = ranking.top(2)
    assert [(l, h) for l, h, _ in top] == order[:2]
    assert "L0" in ranking.table() and "L1" in ranking.table()
    with pytest.raises(ValueError, match="which"):
        ranking.order("loss")


def test_dataset_bad_input(gpt2_model):
    with pytest.raises(TypeError, match="not one string"):
        rank_heads(gpt2_model, "the cat", " dog", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        rank_heads(gpt2_model, SAME, SAME_T, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        rank_heads(gpt2_model, SAME, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        mean_over(gpt2_model, [], " dog")
    with pytest.raises(TypeError, match="target must be a string"):
        rank_heads(gpt2_model, SAME, [" big", None, " cold"], progress=False)


def test_row_target_ids_equal_core_target_nll(gpt2_model):
    """Per-prompt token ids (RowTargetNLL) score exactly what core's target_nll does with the
    equivalent one-token strings per row."""
    from tl_backward.attention.targets import RowTargetNLL
    from tl_backward.core.adapter import get_adapter
    from tl_backward.core.metrics import target_nll

    ad = get_adapter(gpt2_model)
    prompts = ["paris is the capital of", "one two three", "the cat sat on the"]
    words = [" france", " four", " mat"]
    ids = [int(ad.target_tokens(w)[0]) for w in words]
    assert all(ad.target_tokens(w).numel() == 1 for w in words)
    by_ids = reversed_attention(gpt2_model, prompts, metric=RowTargetNLL(tuple(ids)), prepend_bos=True)
    by_str = reversed_attention(gpt2_model, prompts, metric=target_nll(words), prepend_bos=True)
    assert float(by_ids.metric) == float(by_str.metric)  # the same loss graph: bit-identical, like the maps
    torch.testing.assert_close(by_ids.maps, by_str.maps, atol=0, rtol=0)
    with pytest.raises(ValueError, match="targets for"):
        reversed_attention(gpt2_model, prompts, metric=RowTargetNLL(tuple(ids[:2])), prepend_bos=True)
