"""The batched logit lens of flow-graph nodes against a plain-HF computation (final norm + lm_head),
across chunk boundaries and with the normalised lens."""

import math

import pytest
import torch

import tl_backward.flow.project as P
from tl_backward.core.adapter import get_adapter
from tests.tolerance import fp32_rtol


@pytest.mark.parametrize("rows_per_chunk,post_rows", [(3, 2), (1000, 32)])
@pytest.mark.parametrize("normalize", [False, True])
def test_project_matches_hf_lens(model, family, fresh_hf, monkeypatch, rows_per_chunk, post_rows,
                                  normalize):
    ad = get_adapter(model)
    monkeypatch.setattr(P, "CHUNK_ELEMENTS", rows_per_chunk * ad.d_vocab)
    monkeypatch.setattr(P, "POST_ROWS", post_rows)
    gen = torch.Generator().manual_seed(0)
    # mixed scales, including tiny gradient-like vectors and one zero row
    v = torch.randn(10, ad.d_model, generator=gen) * torch.logspace(-6, 1, 10)[:, None]
    v[4] = 0
    target, k = 7, 4
    pr = P.project(ad, v, target, k=k, normalize=normalize)

    hf = fresh_hf(family)
    ln_f = {"gpt2": lambda: hf.transformer.ln_f, "neox": lambda: hf.gpt_neox.final_layer_norm,
            "llama": lambda: hf.model.norm}[family]()
    x = v.double()
    if normalize:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    with torch.no_grad():
        logits = hf.lm_head(ln_f(x.float())).double()
    probs = torch.softmax(logits, -1)
    # final norm, lm_head, softmax (chunked vs whole): a probability's relative error is its logit's
    # absolute error, fp32 accumulation relative to the logits' size
    rel = fp32_rtol(2 * ad.d_model + ad.d_vocab) * max(1.0, float(logits.abs().max()))
    torch.testing.assert_close(pr.top_probs.double(), probs.topk(k, -1).values, rtol=rel, atol=0)
    assert torch.equal(pr.top_ids, probs.topk(k, -1).indices)
    assert torch.equal(pr.bottom_ids, probs.topk(k, -1, largest=False).indices)
    torch.testing.assert_close(pr.target_prob.double(), probs[:, target], rtol=rel, atol=0)
    t = logits[:, target:target + 1]
    assert torch.equal(pr.rank, (logits > t).sum(-1))
    assert torch.equal(pr.bottom_rank, (logits < t).sum(-1))
    ent = -(probs * probs.clamp_min(1e-300).log()).sum(-1) / math.log(2)
    # |δH| ≤ Σ|δp|·|log₂p + 1/ln 2| ≤ rel·(H + 1/ln 2)
    torch.testing.assert_close(pr.entropy.double(), ent, rtol=0, atol=rel * (float(ent.max()) + 2))
