"""The batched logit lens of flow-graph nodes against a plain-HF computation (final norm + lm_head),
across row and vocabulary chunk boundaries and with the normalised lens."""

import math

import pytest
import torch

import tl_backward.flow.project as P
from tl_backward.core.adapter import get_adapter
from tests.tolerance import fp32_rtol


# (row_chunk, vocab_chunk): ragged row and vocabulary tiles (vocab 72 = 5·13 + 7), one column per
# tile, and the defaults (one tile)
@pytest.mark.parametrize("row_chunk,vocab_chunk", [(3, 13), (4, 1), (2048, None)])
@pytest.mark.parametrize("normalize", [False, True])
def test_project_matches_hf_lens(model, family, fresh_hf, row_chunk, vocab_chunk, normalize):
    ad = get_adapter(model)
    gen = torch.Generator().manual_seed(0)
    # mixed scales, including tiny gradient-like vectors and one zero row
    v = torch.randn(10, ad.d_model, generator=gen) * torch.logspace(-6, 1, 10)[:, None]
    v[4] = 0
    target, k = 7, 4
    pr = P.project(ad, v, target, k=k, normalize=normalize, row_chunk=row_chunk, vocab_chunk=vocab_chunk)

    hf = fresh_hf(family)
    ln_f = {"gpt2": lambda: hf.transformer.ln_f, "neox": lambda: hf.gpt_neox.final_layer_norm,
            "llama": lambda: hf.model.norm}[family]()
    x = v.double()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    with torch.no_grad():
        logits = hf.get_output_embeddings()(ln_f(x.float())).double()  # NeoX: embed_out on transformers 4.x
    probs = torch.softmax(logits, -1)
    # final norm, lm_head, softmax (chunked vs whole): a probability's relative error is its logit's
    # absolute error, fp32 accumulation relative to the logits' size
    rel = fp32_rtol(2 * ad.d_model + ad.d_vocab) * max(1.0, float(logits.abs().max()))
    torch.testing.assert_close(pr.top_probs.double(), probs.topk(k, -1).values, rtol=rel, atol=0)
    # ids: exactly the reference's top/bottom-k, up to the order among exactly tied logits (the zero
    # row's logits are all equal; which k of them a tiled top-k keeps is arbitrary)
    for ids, largest in ((pr.top_ids, True), (pr.bottom_ids, False)):
        assert torch.equal(logits.gather(1, ids), logits.topk(k, -1, largest=largest).values)
        assert all(len(set(row)) == k for row in ids.tolist())
    torch.testing.assert_close(pr.target_prob.double(), probs[:, target], rtol=rel, atol=0)
    t = logits[:, target:target + 1]
    assert torch.equal(pr.rank, (logits > t).sum(-1))
    assert torch.equal(pr.bottom_rank, (logits < t).sum(-1))
    ent = -(probs * probs.clamp_min(1e-300).log()).sum(-1) / math.log(2)
    # |δH| ≤ Σ|δp|·|log₂p + 1/ln 2| ≤ rel·(H + 1/ln 2)
    torch.testing.assert_close(pr.entropy.double(), ent, rtol=0, atol=rel * (float(ent.max()) + 2))
