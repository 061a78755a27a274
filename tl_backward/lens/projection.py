"""Chunked vocabulary projection: top-k, bottom-k and ranks without a ``[rows, vocab]`` matrix.

Pure tensor functions (no model, no hooks). The caller applies the model's final norm first;
here ``logits = h @ W_U + b_U`` is computed one ``[row_chunk, vocab_chunk]`` tile at a time, the
k largest and k smallest of each tile are merged into running lists, and ranks are counted
against per-row thresholds.

Rank convention (as TransformerLens's ``target_ranks``): rank(t) = #{k : logit_k > logit_t},
so 0 is the most probable token; softmax is monotone, so logit and probability ranks agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

# Tile sizes: a [rows, vocab_chunk] fp32 tile of ~16-32 MB keeps the matmul efficient and the
# top-k / comparison passes cache-friendly (tuned in benchmarks/bench_backward_lens.py).
VOCAB_CHUNK = 8192
ROW_CHUNK = 1024


@dataclass(frozen=True)
class VocabReadout:
    """Per row: the ``k`` highest-logit tokens (descending), the ``k`` lowest (ascending: least
    probable first), and the rank of each requested token id."""

    top_ids: Int[Tensor, "rows k"]
    top_logits: Float[Tensor, "rows k"]
    bottom_ids: Int[Tensor, "rows k"]
    bottom_logits: Float[Tensor, "rows k"]
    ranks: Int[Tensor, "rows m"]


def l2_normalize(v: Float[Tensor, "... d"], eps: float = 1e-12) -> Float[Tensor, "... d"]:
    """``v / ‖v‖`` (the paper's normalised lens); zero vectors stay zero."""
    return v / v.norm(dim=-1, keepdim=True).clamp(min=eps)


@torch.no_grad()
def vocab_readout(
    h: Float[Tensor, "rows d_model"],
    W_U: Float[Tensor, "d_model vocab"],
    b_U: Float[Tensor, " vocab"],
    *,
    k: int,
    rank_ids: Int[Tensor, "rows m"] | None = None,
    vocab_chunk: int = VOCAB_CHUNK,
    row_chunk: int = ROW_CHUNK,
) -> VocabReadout:
    """Top-k / bottom-k tokens and ranks of ``rank_ids`` for ``logits = h @ W_U + b_U``.

    Memory is ``O(row_chunk · vocab_chunk)``; the full ``[rows, vocab]`` logits never exist.
    ``h`` is already normalised (``ln_final``). Ranks count strictly larger logits; a token's own
    tile entry is excluded from its count, so rounding differences between the tile matmul and the
    threshold dot product cannot rank a token below itself.
    """
    if h.ndim != 2 or W_U.ndim != 2 or h.shape[1] != W_U.shape[0]:
        raise ValueError(f"h must be [rows, d_model] and W_U [d_model, vocab]; got {tuple(h.shape)}, {tuple(W_U.shape)}")
    rows, vocab = h.shape[0], W_U.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size), got {k!r}")
    if rank_ids is None:
        rank_ids = torch.zeros(rows, 0, dtype=torch.long)
    if rank_ids.ndim != 2 or rank_ids.shape[0] != rows:
        raise ValueError(f"rank_ids must be [{rows}, m], got {tuple(rank_ids.shape)}")
    if rank_ids.numel() and (int(rank_ids.min()) < 0 or int(rank_ids.max()) >= vocab):
        raise ValueError(f"rank_ids must lie in [0, {vocab})")
    h = h.float()
    # [vocab, d] contiguous rows make every vocabulary tile one contiguous block (no copy for
    # GPT-2's tied W_U = W_Eᵀ or an nn.Linear lm_head, whose W_U is already such a transpose).
    WT = W_U.float().T.contiguous()
    b_U = b_U.float().contiguous()
    rank_ids = rank_ids.to(h.device)
    out = {name: [] for name in ("ti", "tv", "bi", "bv", "rk")}
    for r0 in range(0, rows, row_chunk):
        hr, ids = h[r0:r0 + row_chunk], rank_ids[r0:r0 + row_chunk]
        thr = torch.einsum("rd,rmd->rm", hr, WT[ids]) + b_U[ids]  # [r, m]
        counts = torch.zeros(ids.shape, dtype=torch.long, device=h.device)
        tv = ti = bv = bi = None
        for c0 in range(0, vocab, vocab_chunk):
            c1 = min(c0 + vocab_chunk, vocab)
            logits = torch.addmm(b_U[c0:c1], hr, WT[c0:c1].T)  # [r, C]
            kk = min(k, c1 - c0)
            v1, i1 = logits.topk(kk, dim=1)
            v2, i2 = logits.topk(kk, dim=1, largest=False)
            tv, ti = _merge(tv, ti, v1, i1 + c0, k, largest=True)
            bv, bi = _merge(bv, bi, v2, i2 + c0, k, largest=False)
            if ids.shape[1]:
                counts += (logits[:, None, :] > thr[:, :, None]).sum(-1)
                inside = (ids >= c0) & (ids < c1)
                own = logits.gather(1, (ids - c0).clamp(0, c1 - c0 - 1))
                counts -= (inside & (own > thr)).long()
        for name, t in zip(("ti", "tv", "bi", "bv", "rk"), (ti, tv, bi, bv, counts)):
            out[name].append(t)
    cat = {name: torch.cat(ts) for name, ts in out.items()}
    return VocabReadout(top_ids=cat["ti"], top_logits=cat["tv"], bottom_ids=cat["bi"],
                        bottom_logits=cat["bv"], ranks=cat["rk"])


def _merge(vals: Tensor | None, ids: Tensor | None, new_vals: Tensor, new_ids: Tensor, k: int,
           largest: bool) -> tuple[Tensor, Tensor]:
    """Merge a tile's candidates into the running k best (sorted)."""
    if vals is not None:
        new_vals, new_ids = torch.cat([vals, new_vals], 1), torch.cat([ids, new_ids], 1)
    kk = min(k, new_vals.shape[1])
    v, pos = new_vals.topk(kk, dim=1, largest=largest)
    return v, new_ids.gather(1, pos)


__all__ = ["VocabReadout", "vocab_readout", "l2_normalize", "VOCAB_CHUNK", "ROW_CHUNK"]
