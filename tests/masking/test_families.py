"""Per-family MAS masks (tl_backward/masking/families.py) against explicit recomputation on the HF model:
sliding windows (segment rule AND the layer's window), MPT's inverted bool mask, the additive mask of
delegating bridges (GPT-J, OPT), and the GPT-Neo refusal."""

import pytest
import torch

from tests.families import build
from tests.tolerance import MODEL_TERMS, assert_close_fp32
from tl_backward.core.compat import TL_MAJOR, TL_VERSION
from tl_backward.errors import TLBackwardError
from tl_backward.masking import answer_loss, mas_generate, segment_mask
from tl_backward.masking import segments as S

from .helpers import no_cache_generate, pairwise_mask, windowed_additive

PROMPTS = [["the cat sat on", "where is the cat ?"], ["big dog", "red", "what is it"]]
ANSWERS = ["A :", "A"]


@pytest.fixture(scope="module", params=["mistral", "gemma2", "mpt", "gptj", "opt"])
def family(request):
    return request.param, *build(request.param)


def _hf_mask(hf, seg):
    """What the HF model must see: the looped pairwise rule, windowed on sliding layers."""
    keep = pairwise_mask(seg.segment_ids, seg.valid)
    cfg = hf.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return windowed_additive(keep, window)
    return {t: windowed_additive(keep, window if t == "sliding_attention" else None) for t in set(types)}


def _no_cache(hf, seg, n):
    return no_cache_generate(hf, seg, n, run=lambda cur: hf(cur.tokens, attention_mask=_hf_mask(hf, cur),
                                                             position_ids=cur.position_ids).logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_segment_mask_logits_equal_hf_under_the_explicit_mask(family, side):
    name, hf, model = family
    seg = S.from_blocks(model, PROMPTS, ANSWERS, padding_side=side)
    with torch.no_grad(), segment_mask(model, seg):
        got = model(seg.tokens)
    with torch.no_grad():
        ref = hf(seg.tokens, attention_mask=_hf_mask(hf, seg), position_ids=seg.position_ids).logits
    assert_close_fp32(got[seg.valid], ref[seg.valid], n_terms=MODEL_TERMS, what=f"{name} MAS logits")


def test_sliding_window_is_kept_under_mas():
    """The window matters on these prompts: the unwindowed mask gives different logits."""
    hf, model = build("mistral")
    seg = S.from_blocks(model, PROMPTS, ANSWERS, padding_side="left")
    keep = pairwise_mask(seg.segment_ids, seg.valid)
    with torch.no_grad(), segment_mask(model, seg):
        got = model(seg.tokens)
    with torch.no_grad():
        unwindowed = hf(seg.tokens, attention_mask=windowed_additive(keep, None), position_ids=seg.position_ids).logits
    assert float((got[seg.valid] - unwindowed[seg.valid]).abs().max()) > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_generation_equals_no_cache_windowed_reference(family, side, request):
    name, hf, model = family
    if name == "mpt" and TL_MAJOR < 4:  # known gap, reported: its KV cache stays empty after the prefill
        request.applymarker(pytest.mark.xfail(raises=RuntimeError, strict=True, reason=(
            f"TransformerLens {TL_VERSION}'s MPT bridge returns no filled KV cache from the prefill")))
    seg = S.from_blocks(model, PROMPTS, ANSWERS, padding_side=side)
    out = mas_generate(model, seg, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(out.new_tokens, _no_cache(hf, seg, 6)), name


def test_causal_finetune_loss_is_the_models_own_causal_loss():
    """mask="causal" on a sliding-window model = HF's own (windowed) causal mask from a 2-D padding mask."""
    hf, model = build("mistral")
    seg = S.from_blocks(model, PROMPTS, ANSWERS, padding_side="right")
    with torch.no_grad():
        got = answer_loss(model, seg, mask="causal")
        logits = hf(seg.tokens, attention_mask=seg.valid.long()).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, seg.tokens[:, 1:, None]).squeeze(-1)
    ref = -logp[seg.target[:, 1:]].mean()
    assert_close_fp32(got, ref, n_terms=MODEL_TERMS, what="causal answer loss")


def test_gpt_neo_is_refused_naming_why():
    hf, model = build("gpt_neo")
    seg = S.from_blocks(model, PROMPTS, ANSWERS)
    with pytest.raises(TLBackwardError, match="GPT-Neo.*cannot lift causality"):
        with segment_mask(model, seg):
            pass
    with pytest.raises(TLBackwardError, match="GPT-Neo"):
        mas_generate(model, seg, max_new_tokens=2)
