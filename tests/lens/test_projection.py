"""Chunked vocabulary projection against a dense computation and TransformerLens's logit_readout."""

import pytest
import torch

from tests.tolerance import assert_close_fp32, fp32_rtol
from tl_backward.lens.projection import l2_normalize, vocab_readout


def dense_reference(h, W_U, b_U, k, ids):
    logits = h @ W_U + b_U
    top = logits.topk(k, dim=1)
    bottom = logits.topk(k, dim=1, largest=False)
    own = logits.gather(1, ids)
    ranks = (logits[:, None, :] > own[:, :, None]).sum(-1)
    return top, bottom, ranks


@pytest.mark.parametrize("vocab, vocab_chunk, row_chunk", [
    (97, 7, 3), (97, 1000, 1000), (97, 1, 5), (97, 50, 1),
    # blocked top-k paths: whole tiles (512 = 16 blocks), ragged tiles (300 = 9 blocks + 12), default
    (1037, 512, 11), (1037, 300, 4), (1037, None, 11), (50257, None, 6),
])
def test_matches_dense(vocab, vocab_chunk, row_chunk):
    g = torch.Generator().manual_seed(0)
    h, W_U, b_U = torch.randn(11, 16, generator=g), torch.randn(16, vocab, generator=g), torch.randn(vocab, generator=g)
    ids = torch.randint(0, vocab, (11, 3), generator=g)
    r = vocab_readout(h, W_U, b_U, k=4, rank_ids=ids, vocab_chunk=vocab_chunk, row_chunk=row_chunk)
    top, bottom, ranks = dense_reference(h, W_U, b_U, 4, ids)
    # chunked vs dense logits: d_model + 1 (bias) terms each. The top/bottom-k gaps of this seeded data
    # (≥ 7e-4) are far above that error, so the ids are exact.
    n_terms = h.shape[1] + 1
    assert torch.equal(r.top_ids, top.indices)
    assert_close_fp32(r.top_logits, top.values, n_terms=n_terms, what="top logits")
    assert torch.equal(r.bottom_ids, bottom.indices)
    assert_close_fp32(r.bottom_logits, bottom.values, n_terms=n_terms, what="bottom logits")
    # a rank may differ only across a near-tie (one at 8e-6 for vocab 50257): bracket it by the fp32
    # error; where no other logit is that close (≥ half of the ids even at vocab 50257) it is exact
    logits = h @ W_U + b_U
    tol = fp32_rtol(n_terms) * float(logits.abs().max())
    own = logits.gather(1, ids)[:, :, None]
    lo, hi = (logits[:, None, :] > own + tol).sum(-1), (logits[:, None, :] > own - tol).sum(-1) - 1
    assert bool(((lo <= r.ranks) & (r.ranks <= hi)).all())
    assert torch.equal(r.ranks[lo == hi], ranks[lo == hi]) and float((lo == hi).float().mean()) > 0.4
    assert bool((r.top_logits[:, :-1] >= r.top_logits[:, 1:]).all())  # descending
    assert bool((r.bottom_logits[:, :-1] <= r.bottom_logits[:, 1:]).all())  # least probable first


def test_blocked_topk_with_ties():
    """Many equal logits: any k of the tied maxima is a right answer; values must be exact."""
    h = torch.ones(2, 1)
    W_U = torch.zeros(1, 4096)
    W_U[0, ::7] = 1.0
    r = vocab_readout(h, W_U, torch.zeros(4096), k=5, vocab_chunk=2048)
    assert r.top_logits.eq(1.0).all() and bool((r.top_ids % 7 == 0).all())
    assert r.bottom_logits.eq(0.0).all() and bool((r.bottom_ids % 7 != 0).all())
    assert len(set(r.top_ids[0].tolist())) == 5


def test_rank_extremes_and_ties():
    W_U = torch.eye(4)
    h = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    r = vocab_readout(h, W_U, torch.zeros(4), k=4, rank_ids=torch.tensor([[0, 3, 2]]), vocab_chunk=2)
    assert r.ranks.tolist() == [[0, 3, 2]]
    # ties: nothing is strictly larger than a tied maximum -> rank 0 (TransformerLens convention)
    r = vocab_readout(torch.ones(1, 4), W_U, torch.zeros(4), k=1, rank_ids=torch.tensor([[1]]))
    assert r.ranks.tolist() == [[0]]


def test_k_equals_vocab_and_no_ids():
    h, W_U = torch.randn(2, 3), torch.randn(3, 5)
    r = vocab_readout(h, W_U, torch.zeros(5), k=5, vocab_chunk=2)
    assert sorted(r.top_ids[0].tolist()) == list(range(5))
    assert r.ranks.shape == (2, 0)


def test_matches_transformer_lens_logit_readout(gpt2_model):
    """Our ln_final + chunked top-k/ranks agree with TL's logit_readout on real residual vectors."""
    logit_readout = getattr(pytest.importorskip("transformer_lens.tools.analysis"), "logit_readout", None)
    if logit_readout is None:
        pytest.skip("transformer_lens.tools.analysis.logit_readout is new in TransformerLens 4.x")
    from tl_backward.core.adapter import get_adapter

    ad = get_adapter(gpt2_model)
    v = torch.randn(9, ad.d_model, generator=torch.Generator().manual_seed(3)) * 2
    tgt = torch.arange(9) % ad.d_vocab
    ours = vocab_readout(ad.ln_final(v), ad.W_U, ad.b_U, k=5, rank_ids=tgt[:, None], vocab_chunk=13)
    tl_top = logit_readout(gpt2_model, v, top_k=5)
    tl_rank = logit_readout(gpt2_model, v, targets=tgt)
    assert torch.equal(ours.top_ids, tl_top.top_ids)
    assert torch.equal(ours.ranks[:, 0], tl_rank.target_ranks.reshape(-1))


def test_bad_input():
    h, W_U, b = torch.randn(2, 3), torch.randn(3, 5), torch.zeros(5)
    for k in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int in"):
            vocab_readout(h, W_U, b, k=k)
    with pytest.raises(ValueError, match="rank_ids must lie"):
        vocab_readout(h, W_U, b, k=1, rank_ids=torch.tensor([[5], [0]]))
    with pytest.raises(ValueError, match="rank_ids must be"):
        vocab_readout(h, W_U, b, k=1, rank_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="vocab_chunk must be a positive int"):
        vocab_readout(h, W_U, b, k=1, vocab_chunk=0)
    with pytest.raises(ValueError, match="h must be"):
        vocab_readout(torch.randn(2, 4), W_U, b, k=1)


def test_l2_normalize():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    # a norm of 2 squares and one division
    assert torch.allclose(l2_normalize(v), torch.tensor([[0.6, 0.8], [0.0, 0.0]]), rtol=fp32_rtol(2), atol=0)
