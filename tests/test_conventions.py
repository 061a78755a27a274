"""Conventions every public function shares (tl_backward/core/checks.py, README "Conventions"):

* layer ``-1`` is the model's last layer everywhere (one meaning of a negative layer index);
* a list/tuple target holds one target per prompt, ids exactly like strings.

Each check compares a call spelled with the negative index (or with ids) against the same call
spelled with the positive index (or with strings), and the batch against single-prompt runs.
"""

import pytest
import torch

import tl_backward as tlb
from tl_backward.core.adapter import get_adapter
from tl_backward.flow import ln_filter
from tl_backward.masking import attention_patterns
from tl_backward.masking import segments as S
from tests.tolerance import MODEL_TERMS, assert_close_fp32

PROMPT = "the cat sat on the"
TWO = ["the cat sat on the", "a dog ran to the"]


def test_adapter_layers(model):
    ad = get_adapter(model)
    last = ad.n_layers - 1
    assert ad.check_layer(-1) == last and ad.check_layer(-ad.n_layers) == 0
    assert ad.layers(-1) == [last] and ad.layers([-1, 0]) == [last, 0]
    assert ad.hook_name("pattern", -1) == ad.hook_name("pattern", last) == f"blocks.{last}.attn.hook_pattern"


def test_reversed_attention_results(gpt2_model):
    last = gpt2_model.cfg.n_layers - 1
    neg = tlb.reversed_attention(gpt2_model, PROMPT, " mat", layers=-1)
    pos = tlb.reversed_attention(gpt2_model, PROMPT, " mat", layers=last)
    assert neg.layers == pos.layers == (last,) and torch.equal(neg.maps, pos.maps)
    full = tlb.reversed_attention(gpt2_model, PROMPT, " mat")
    assert full.layer_index(-1) == full.layer_index(last) == full.layers.index(last)
    assert torch.equal(full.map(-1, -1), full.map(last, full.maps.shape[2] - 1))
    assert full.mean().layer_index(-1) == full.layers.index(last)  # a mean keeps the model's layer count


def test_patching_and_ablation(gpt2_model):
    last, n_heads = gpt2_model.cfg.n_layers - 1, gpt2_model.cfg.n_heads
    ra = tlb.reversed_attention(gpt2_model, PROMPT, " mat")
    with tlb.patch_attention(gpt2_model, ra, eta=0.1, layers=-1, heads=[(-1, -1)]) as deltas:
        assert list(deltas) == [last]
        patched = tlb.capture(gpt2_model, PROMPT, tlb.metrics.target_nll(" mat"), names="hook_embed").metric
    with tlb.patch_attention(gpt2_model, ra, eta=0.1, layers=last, heads=[(last, n_heads - 1)]):
        same = tlb.capture(gpt2_model, PROMPT, tlb.metrics.target_nll(" mat"), names="hook_embed").metric
    assert torch.equal(patched, same)
    with tlb.zero_heads(gpt2_model, [(-1, -1), (0, 0)]) as ablated:
        assert ablated == [(0, 0), (last, n_heads - 1)]


def test_lens_and_cache(gpt2_model):
    last = gpt2_model.cfg.n_layers - 1
    gf = tlb.gradient_factors(gpt2_model, PROMPT, " mat", layers=-1)
    assert gf.layers == (last,) and gf[-1, "mlp_in"] is gf[last, "mlp_in"]
    lens = tlb.backward_lens(gpt2_model, PROMPT, " mat")
    assert lens.layer_index(-1) == lens.layers.index(last)
    assert lens.tokens("mlp_out", -1, -1) == lens.tokens("mlp_out", last, lens.factors.n_tokens - 1)
    cache = tlb.capture(gpt2_model, PROMPT, tlb.metrics.target_nll(" mat"),
                        names=f"blocks.{last}.hook_resid_pre")
    assert cache["resid_pre", -1] is cache[f"blocks.{last}.hook_resid_pre"]


def test_editing(gpt2_model):
    last = gpt2_model.cfg.n_layers - 1
    with tlb.forward_pass_shift(gpt2_model, PROMPT, " dog", layer=-1, eta=0.5) as neg:
        delta_neg = neg.delta
    with tlb.forward_pass_shift(gpt2_model, PROMPT, " dog", layer=last, eta=0.5) as pos:
        delta_pos = pos.delta
    assert neg.layer == pos.layer == last and torch.equal(delta_neg, delta_pos)
    request = {"prompt": "the capital of france is", "target_new": "rome", "target_true": "paris",
               "paraphrases": [], "neighborhood": []}
    assert tlb.evaluate_edits(gpt2_model, [request], layer=-1, eta=0.5, progress=False).layer == last


def test_flow_and_masking(gpt2_model):
    last = gpt2_model.cfg.n_layers - 1
    assert tlb.flow_graph(gpt2_model, PROMPT, layer=-1, position=-2).layers == (last,)
    f_neg = ln_filter(gpt2_model, [PROMPT], layer=-1)
    f_pos = ln_filter(gpt2_model, [PROMPT], layer=last)
    assert f_neg.layer == f_pos.layer == last and torch.equal(f_neg.delta, f_pos.delta)
    seg = S.from_blocks(gpt2_model, ["the cat sat", "where is the cat"], "on the mat")
    assert torch.equal(attention_patterns(gpt2_model, seg, layers=-1),
                       attention_patterns(gpt2_model, seg, layers=last))


# ------------------------------------------------------------------------------------------ targets
def _ids(model, words):
    ad = get_adapter(model)
    return [int(ad.target_tokens(w)[0]) for w in words]


def test_a_list_of_ids_is_one_id_per_prompt_like_a_list_of_strings(model):
    words = [" mat", " dog"]
    ids = _ids(model, words)
    by_ids = tlb.capture(model, TWO, tlb.metrics.target_nll(ids), names="hook_embed", prepend_bos=True)
    by_words = tlb.capture(model, TWO, tlb.metrics.target_nll(words), names="hook_embed", prepend_bos=True)
    mixed = tlb.capture(model, TWO, tlb.metrics.target_nll((words[0], ids[1])), names="hook_embed",
                        prepend_bos=True)
    assert torch.equal(by_ids.metric, by_words.metric) and torch.equal(mixed.metric, by_words.metric)
    singles = sum(tlb.capture(model, p, tlb.metrics.target_nll(i), names="hook_embed", prepend_bos=True).metric
                  for p, i in zip(TWO, ids))
    assert_close_fp32(by_ids.metric, singles, n_terms=MODEL_TERMS, what="batch of per-row ids vs single runs")
    grads_ids = by_ids.grad("hook_embed")
    assert torch.equal(grads_ids, by_words.grad("hook_embed"))


def test_per_prompt_ids_in_the_lens_and_the_ranking(gpt2_model):
    words = [" mat", " dog"]
    ids = _ids(gpt2_model, words)
    assert tlb.backward_lens(gpt2_model, TWO, ids).target_ids.tolist() == ids
    by_ids = tlb.rank_heads(gpt2_model, TWO, ids, progress=False)
    by_mixed = tlb.rank_heads(gpt2_model, TWO, [words[0], ids[1]], progress=False)
    by_words = tlb.rank_heads(gpt2_model, TWO, words, progress=False)
    assert torch.equal(by_ids.reversed_mean, by_words.reversed_mean)
    assert torch.equal(by_mixed.reversed_mean, by_words.reversed_mean)


def test_a_tensor_of_ids_is_one_multi_token_target_for_every_prompt(gpt2_model):
    ids = _ids(gpt2_model, [" on", " the"])
    as_tensor = tlb.capture(gpt2_model, TWO, tlb.metrics.target_nll(torch.tensor(ids)), names="hook_embed")
    as_text = tlb.capture(gpt2_model, TWO, tlb.metrics.target_nll(" on the"), names="hook_embed")
    assert torch.equal(as_tensor.metric, as_text.metric)


def test_a_list_of_the_wrong_length_is_refused_whatever_it_holds(gpt2_model):
    for target in ([5, 6, 7], [" a", " b", " c"], [5]):
        with pytest.raises(tlb.errors.TLBackwardError, match="one target per prompt") as err:
            tlb.capture(gpt2_model, TWO, tlb.metrics.target_nll(target), names="hook_embed")
        assert err.value.argument == "target"
