"""The one chunked logit-lens readout (tl_backward/core/readout.py) against a naive full-vocabulary
softmax in fp64: across row and vocabulary chunk boundaries, with a final norm, and under exact ties."""

import math

import pytest
import torch

from tl_backward.core.adapter import get_adapter
from tl_backward.core.readout import Unembed, entropy_bits, logits_readout, normalize_rows, readout
from tl_backward.errors import TLBackwardError
from tests.tolerance import assert_close_fp32, fp32_rtol


def naive(logits: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every statistic from the whole [rows, vocab] block at once (fp64)."""
    logits = logits.double()
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    own = logits.gather(1, ids)[:, :, None]
    return dict(p=p, log_z=torch.logsumexp(logits, -1), entropy=-(p * logp).sum(-1) / math.log(2),
                ranks=(logits[:, None, :] > own).sum(-1), bottom_ranks=(logits[:, None, :] < own).sum(-1),
                target_probs=p.gather(1, ids))


def check_ids(ids: torch.Tensor, logits: torch.Tensor, k: int, largest: bool) -> None:
    """``ids`` are a top-k (bottom-k) of ``logits``: distinct, and their values are the sorted top-k
    values (so any choice among exactly tied logits passes, and nothing else does)."""
    assert all(len(set(row)) == k for row in ids.tolist())
    assert torch.equal(logits.gather(1, ids), logits.topk(k, -1, largest=largest).values)


def random_case(vocab: int, rows: int = 11, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W_U, b_U = torch.randn(d, vocab, generator=g), torch.randn(vocab, generator=g)
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
        norm.bias.copy_(0.2 * torch.randn(d, generator=g))
    h = torch.randn(rows, d, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    return h, W_U, b_U, norm, torch.randint(0, vocab, (rows, 3), generator=g)


@pytest.mark.parametrize("vocab, vocab_chunk, row_chunk", [
    (97, 7, 3), (97, 1, 5), (97, 1000, 1000), (97, 50, 1),
    # blocked top-k: whole tiles (512 = 16 blocks), ragged tiles (300 = 9 blocks + 12), default tile
    (1037, 512, 11), (1037, 300, 4), (1037, None, 11), (50257, None, 6),
])
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_naive_softmax(vocab, vocab_chunk, row_chunk, normalize):
    h, W_U, b_U, norm, ids = random_case(vocab)
    r = Unembed(W_U, b_U, norm).readout(h, k=4, targets=ids, softmax=True, bottom_ranks=True, normalize=normalize,
                                        vocab_chunk=vocab_chunk, row_chunk=row_chunk)
    x = h.double() / h.double().norm(dim=-1, keepdim=True) if normalize else h.double()
    with torch.no_grad():
        logits = torch.nn.functional.layer_norm(x, (h.shape[1],), norm.weight.double(), norm.bias.double(),
                                                norm.eps) @ W_U.double() + b_U.double()
    ref = naive(logits, ids)
    # fp32 logits: a norm (d terms) then d + 1 products; the seeded top/bottom-4 gaps are far wider
    n_terms = 2 * h.shape[1] + 1
    scale = float(logits.abs().max())
    assert torch.equal(r.top_ids, logits.topk(4, -1).indices)
    assert torch.equal(r.bottom_ids, logits.topk(4, -1, largest=False).indices)
    assert_close_fp32(r.top_logits, logits.topk(4, -1).values, n_terms=n_terms, scale=scale, what="top logits")
    assert_close_fp32(r.bottom_logits, logits.topk(4, -1, largest=False).values, n_terms=n_terms, scale=scale)
    assert_close_fp32(r.target_logits, logits.gather(1, ids), n_terms=n_terms, scale=scale, what="target logits")
    # log Z adds a vocab-long sum; a probability's relative error is its logit's absolute error
    rtol = fp32_rtol(n_terms + vocab) * max(1.0, scale)
    torch.testing.assert_close(r.log_z.double(), ref["log_z"], rtol=0, atol=rtol)
    torch.testing.assert_close(r.target_probs.double(), ref["target_probs"], rtol=rtol, atol=0)
    torch.testing.assert_close(r.top_probs.double(), ref["p"].topk(4, -1).values, rtol=rtol, atol=0)
    # |δH| ≤ max|δlogit|·Σ p|log₂ p + H| ≤ rtol·(2H + 2)
    torch.testing.assert_close(r.entropy.double(), ref["entropy"], rtol=0, atol=rtol * (2 * float(ref["entropy"].max()) + 2))
    # ranks: exact wherever no other logit lies within the fp32 error of the target's (most of them);
    # elsewhere bracketed by the counts at ± that error
    tol = fp32_rtol(n_terms) * scale
    own = logits.gather(1, ids)[:, :, None]
    for got, above, sign in ((r.ranks, ref["ranks"], 1), (r.bottom_ranks, ref["bottom_ranks"], -1)):
        lo = (sign * (logits[:, None, :] - own) > tol).sum(-1)
        hi = (sign * (logits[:, None, :] - own) > -tol).sum(-1) - 1
        assert bool(((lo <= got) & (got <= hi)).all())
        assert torch.equal(got[lo == hi], above[lo == hi]) and float((lo == hi).float().mean()) > 0.4


@pytest.mark.parametrize("vocab_chunk", [1, 5, 32, 64, 96, None])
def test_exact_ties_across_tiles(vocab_chunk):
    """Integer logits with every value repeated many times, tied groups split by tile borders: ranks
    count strictly larger/smaller logits only, any k of tied maxima is a right top-k."""
    g = torch.Generator().manual_seed(1)
    vocab, rows = 300, 6
    W_U = torch.randint(-3, 4, (2, vocab), generator=g).float()
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0], [0.0, 0.0], [1.0, -1.0]])
    ids = torch.randint(0, vocab, (rows, 4), generator=g)
    r = Unembed(W_U).readout(h, k=7, targets=ids, softmax=True, bottom_ranks=True, vocab_chunk=vocab_chunk)
    logits = h.double() @ W_U.double()  # small integers: exact in fp32 too
    ref = naive(logits, ids)
    check_ids(r.top_ids, logits, 7, largest=True)
    check_ids(r.bottom_ids, logits, 7, largest=False)
    assert torch.equal(r.top_logits.double(), logits.topk(7, -1).values)
    assert torch.equal(r.ranks, ref["ranks"]) and torch.equal(r.bottom_ranks, ref["bottom_ranks"])
    assert torch.equal(r.target_logits.double(), logits.gather(1, ids))
    rtol = fp32_rtol(vocab) * float(logits.abs().max())
    torch.testing.assert_close(r.log_z.double(), ref["log_z"], rtol=0, atol=rtol)
    torch.testing.assert_close(r.entropy.double(), ref["entropy"], rtol=0, atol=rtol * 12)
    # the all-zero row is uniform: rank 0 both ways, entropy log2(vocab)
    assert r.ranks[4].eq(0).all() and r.bottom_ranks[4].eq(0).all()
    assert abs(float(r.entropy[4]) - math.log2(vocab)) <= fp32_rtol(vocab) * math.log2(vocab)


def test_logits_readout_matches_naive():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 1037, generator=g) * 4
    ids = torch.randint(0, 1037, (5,), generator=g)
    r = logits_readout(logits, k=3, targets=ids, bottom_ranks=True)
    ref = naive(logits, ids[:, None])
    assert torch.equal(r.top_ids, logits.topk(3, -1).indices)
    assert torch.equal(r.bottom_ids, logits.topk(3, -1, largest=False).indices)
    assert torch.equal(r.ranks, ref["ranks"]) and torch.equal(r.bottom_ranks, ref["bottom_ranks"])
    rtol = fp32_rtol(1037) * float(logits.abs().max())
    torch.testing.assert_close(r.target_probs.double(), ref["target_probs"], rtol=rtol, atol=0)
    torch.testing.assert_close(r.entropy.double(), ref["entropy"], rtol=0, atol=rtol * (2 * float(ref["entropy"].max()) + 2))


def test_one_target_for_all_rows_and_adapter_source(gpt2_model):
    """An int target means the same id in every row; readout(adapter, ...) is the model's own lens."""
    ad = get_adapter(gpt2_model)
    v = torch.randn(4, ad.d_model, generator=torch.Generator().manual_seed(3))
    r = readout(ad, v, k=2, targets=9, softmax=True, vocab_chunk=13)
    hf = gpt2_model.original_model
    with torch.no_grad():
        logits = hf.lm_head(hf.transformer.ln_f(v)).double()
    ref = naive(logits, torch.full((4, 1), 9))
    assert torch.equal(r.ranks, ref["ranks"])
    assert torch.equal(r.top_ids, logits.topk(2, -1).indices)
    rtol = fp32_rtol(2 * ad.d_model + ad.d_vocab) * max(1.0, float(logits.abs().max()))
    torch.testing.assert_close(r.target_probs.double(), ref["target_probs"], rtol=rtol, atol=0)
    # the full-distribution helpers agree with the same reference
    torch.testing.assert_close(ad.unembedding.probs(v, 3).double(), ref["p"], rtol=rtol, atol=0)
    torch.testing.assert_close(entropy_bits(ref["p"]), ref["entropy"], rtol=0, atol=1e-12)


def test_normalize_rows():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0], [3e-42, 4e-42]])  # the last row is subnormal in fp32
    out = normalize_rows(v)
    assert out.dtype == torch.float32 and out[1].eq(0).all()  # zero rows stay zero
    # every other row reaches unit norm, the subnormal one too (its stored entries are not exactly 3:4)
    expected = v.double()[[0, 2]] / v.double()[[0, 2]].norm(dim=-1, keepdim=True)
    assert torch.allclose(out[[0, 2]].double(), expected, rtol=fp32_rtol(2), atol=0)
    assert torch.allclose(expected[0], torch.tensor([0.6, 0.8], dtype=torch.float64))


def test_no_rows_and_no_targets():
    W_U = torch.randn(3, 5)
    r = Unembed(W_U).readout(torch.zeros(0, 3), k=2, softmax=True)
    assert r.top_ids.shape == (0, 2) and r.ranks.shape == (0, 0) and r.entropy.shape == (0,)
    r = Unembed(W_U).readout(torch.randn(2, 3), k=5)
    assert sorted(r.top_ids[0].tolist()) == list(range(5)) and r.ranks.shape == (2, 0)
    assert r.log_z is None and r.bottom_ranks is None


def test_bad_arguments_name_the_argument():
    u = Unembed(torch.randn(3, 5))
    h = torch.randn(2, 3)
    cases = [
        (dict(k=0), "k"), (dict(k=6), "k"), (dict(k=True), "k"), (dict(k=1, targets=5), "targets"),
        (dict(k=1, targets=torch.tensor([[0], [5]])), "targets"), (dict(k=1, targets=torch.zeros(3, 1).long()), "targets"),
        (dict(k=1, targets=torch.zeros(2, 1)), "targets"), (dict(k=1, targets=True), "targets"),
        (dict(k=1, vocab_chunk=0), "vocab_chunk"), (dict(k=1, row_chunk=False), "row_chunk"),
    ]
    for kwargs, argument in cases:
        with pytest.raises(TLBackwardError) as err:
            u.readout(h, **kwargs)
        assert err.value.argument == argument, kwargs
    with pytest.raises(TLBackwardError, match="d_model=3") as err:
        u.readout(torch.randn(2, 4), k=1)
    assert err.value.argument == "vectors"
    with pytest.raises(TLBackwardError, match="softmax=True"):
        u.readout(h, k=1).top_probs
