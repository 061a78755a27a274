"""``reversed_attention(..., keep="norms" | "topk")``: reductions taken per layer inside the backward.

The independent computation is the full-map run (``keep="maps"``, itself checked against plain-HF
autograd in test_reversed.py / test_ra_families.py), reduced here after the fact: Frobenius norms by
``pow(2).sum().sqrt()`` over ``maps``/``patterns`` and the top-k by a ``topk`` over the whole
flattened ``|maps|``. Both runs do the same forward and backward, so the maps agree bit for bit;
only the norm's accumulation order differs (≤ T² fp32 terms).
"""

from __future__ import annotations

import pytest
import torch

from tests.attention.test_ra_families import Family
from tests.reference import assert_no_hooks, assert_untouched
from tests.tolerance import assert_close_fp32
from tl_backward.attention import RANorms, RATopK, frobenius, rank_heads, reversed_attention
from tl_backward.errors import TLBackwardError

PROMPTS = ["the cat sat on the mat and the dog", "paris is the capital of", "one two three"]
TARGETS = [" ran", " france", " four"]
K = 5


def _norm_terms(maps) -> int:
    return maps.shape[-1] ** 2


def check_norms(red, full) -> None:
    assert red.reversed_norms.shape == full.maps.shape[:3]
    assert float(red.reversed_norms.abs().max()) > 1e-6  # a real, non-trivial reduction
    assert_close_fp32(red.reversed_norms, frobenius(full.maps), n_terms=_norm_terms(full.maps), what="‖RA‖_F")
    assert_close_fp32(red.forward_norms, frobenius(full.patterns), n_terms=_norm_terms(full.maps), what="‖P‖_F")
    # consistent with ReversedAttention's own reductions
    for which in ("reversed", "forward"):
        assert_close_fp32(red.head_norms(which), full.head_norms(which), n_terms=_norm_terms(full.maps))
        assert_close_fp32(red.head_norms(which, per_example=True), full.head_norms(which, per_example=True),
                          n_terms=_norm_terms(full.maps))
        assert [(l, h) for l, h, _ in red.top_heads(3, which)] == [(l, h) for l, h, _ in full.top_heads(3, which)]
    assert (red.layers, red.scales, red.n_layers) == (full.layers, full.scales, full.n_layers)
    assert torch.equal(red.tokens, full.tokens) and torch.equal(red.mask, full.mask)
    assert float(red.metric) == float(full.metric)


def check_topk(red, full, k: int) -> None:
    L, B, H, T, _ = full.maps.shape
    assert red.values.shape == red.query.shape == red.key.shape == (L, B, H, min(k, T * T))
    flat = full.maps.flatten(-2)
    expected = flat.abs().topk(min(k, T * T), dim=-1).values
    # the same |values|, in the same descending order, as a topk over the whole map
    assert torch.equal(red.values.abs(), expected)
    # each value is the map's entry at its (query, key): signs kept, positions right
    at = full.maps[torch.arange(L)[:, None, None, None], torch.arange(B)[None, :, None, None],
                   torch.arange(H)[None, None, :, None], red.query, red.key]
    assert torch.equal(red.values, at)
    assert bool((red.values < 0).any()) and bool((red.values > 0).any())
    # the positions are distinct within a head (a genuine top-k, not one edge repeated)
    idx = red.query * T + red.key
    assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_norms_and_topk_equal_reductions_of_full_maps(family, request):
    model = request.getfixturevalue(f"{family}_model")
    full = reversed_attention(model, PROMPTS, TARGETS, prepend_bos=True)
    assert not bool(full.mask.all())  # padded
    norms = reversed_attention(model, PROMPTS, TARGETS, prepend_bos=True, keep="norms")
    assert type(norms) is RANorms
    check_norms(norms, full)
    top = reversed_attention(model, PROMPTS, TARGETS, prepend_bos=True, keep="topk", top_k=K)
    assert isinstance(top, RATopK)
    check_norms(top, full)
    check_topk(top, full, K)
    # a non-zero edge of a padded row never sits on padding
    short = int(full.mask.sum(1).argmin())
    n, real = int(full.mask[short].sum()), top.values[:, short] != 0
    assert bool(real.any()) and bool((top.query[:, short][real] < n).all()) and bool((top.key[:, short][real] < n).all())
    edges = top.edges(-1, 1, row=short)
    assert len(edges) == K and edges[0][2] == float(top.values[-1, short, 1, 0])
    assert_no_hooks(model)
    assert_untouched(model)


def test_layer_subset_and_large_top_k(gpt2_model):
    # a layer subset, model layers counted from the end, top_k above pos² (capped)
    full = reversed_attention(gpt2_model, PROMPTS[0], TARGETS[0], layers=[1], prepend_bos=True)
    red = reversed_attention(gpt2_model, PROMPTS[0], TARGETS[0], layers=[1], prepend_bos=True, keep="topk",
                             top_k=10**6)
    check_norms(red, full)
    check_topk(red, full, 10**6)
    assert red.layer_index(-1) == 0
    with pytest.raises(TLBackwardError) as err:
        red.layer_index(0)
    assert err.value.argument == "layer"


def test_value_route_family():
    fam = Family("gptj", seed=5)
    full = reversed_attention(fam.bridge, PROMPTS, TARGETS, prepend_bos=True)
    assert not bool(full.mask.all())
    top = reversed_attention(fam.bridge, PROMPTS, TARGETS, prepend_bos=True, keep="topk", top_k=K)
    check_norms(top, full)
    check_topk(top, full, K)
    assert_untouched(fam.bridge)


def test_rank_heads_equals_reductions_of_full_maps(llama_model):
    full = reversed_attention(llama_model, PROMPTS, TARGETS, prepend_bos=True)
    r, f = frobenius(full.maps), frobenius(full.patterns)  # [layer, batch, head]
    ranking = rank_heads(llama_model, PROMPTS, TARGETS, batch_size=3, prepend_bos=True, progress=False)
    n = _norm_terms(full.maps)
    assert_close_fp32(ranking.reversed_mean, r.mean(1), n_terms=n, what="RA mean")
    assert_close_fp32(ranking.reversed_std, r.std(1), n_terms=n, scale=float(r.max()), what="RA std")
    assert_close_fp32(ranking.forward_mean, f.mean(1), n_terms=n, what="P mean")
    assert_close_fp32(ranking.forward_std, f.std(1), n_terms=n, scale=float(f.max()), what="P std")
    assert_no_hooks(llama_model)
    assert_untouched(llama_model)


def test_reprs_are_one_line(gpt2_model):
    for keep in ("norms", "topk"):
        res = reversed_attention(gpt2_model, PROMPTS[:2], TARGETS[:2], prepend_bos=True, keep=keep, top_k=3)
        text = repr(res)
        assert "\n" not in text and text.startswith(type(res).__name__) and "batch 2" in text
    assert "top 3 edges" in text


@pytest.mark.parametrize("kwargs, argument", [
    (dict(keep="map"), "keep"), (dict(keep=None), "keep"), (dict(keep=["norms"]), "keep"),
    (dict(keep="topk", top_k=0), "top_k"), (dict(keep="topk", top_k=2.5), "top_k"),
])
def test_bad_keep_is_refused(gpt2_model, kwargs, argument):
    with pytest.raises(TLBackwardError) as err:
        reversed_attention(gpt2_model, PROMPTS[0], TARGETS[0], **kwargs)
    assert err.value.argument == argument and argument in str(err.value)
    assert_no_hooks(gpt2_model)


def test_bad_result_lookups(gpt2_model):
    red = reversed_attention(gpt2_model, PROMPTS[0], TARGETS[0], keep="topk", top_k=2)
    for call, argument in ((lambda: red.head_norms("both"), "which"), (lambda: red.edges(0, 9), "head"),
                           (lambda: red.edges(0, 0, row=1), "row"), (lambda: red.top_heads(0), "k")):
        with pytest.raises(TLBackwardError) as err:
            call()
        assert err.value.argument == argument
