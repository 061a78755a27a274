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

# Tile sizes (tuned with benchmarks/bench_backward_lens.py on 2 shared CPU cores): few, large
# tiles win, because every tensor op is a parallel region whose barrier costs dearly when cores
# are contended. The vocabulary chunk fills TILE_ELEMENTS (e.g. 1536 rows x 10912 tokens; the
# full GPT-2-small [1536, 50257] block would be 309 MB).
TILE_ELEMENTS = 1 << 24  # 64 MB of fp32 logits per tile (plus one buffer of the same size)
ROW_CHUNK = 2048
BLOCK = 32  # block width of the blocked top-k (see _tile_topk)


@dataclass(frozen=True)
class VocabReadout:
    """Per row: the ``k`` highest-logit tokens (descending), the ``k`` lowest (ascending: least
    probable first), and the rank of each requested token id."""

    top_ids: Int[Tensor, "rows k"]
    top_logits: Float[Tensor, "rows k"]
    bottom_ids: Int[Tensor, "rows k"]
    bottom_logits: Float[Tensor, "rows k"]
    ranks: Int[Tensor, "rows m"]

    def __repr__(self) -> str:
        return f"VocabReadout({self.top_ids.shape[0]} rows, top/bottom {self.top_ids.shape[1]}, ranks of {self.ranks.shape[1]} ids)"


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
    vocab_chunk: int | None = None,
    row_chunk: int = ROW_CHUNK,
) -> VocabReadout:
    """Top-k / bottom-k tokens and ranks of ``rank_ids`` for ``logits = h @ W_U + b_U``.

    Memory is two ``[row_chunk, vocab_chunk]`` fp32 tiles (default: ``vocab_chunk`` fills
    :data:`TILE_ELEMENTS`, balanced over the vocabulary); the full ``[rows, vocab]`` logits never exist.
    ``h`` is already normalised (``ln_final``). Ranks count strictly larger logits; a token's own
    tile entry is excluded from its count, so rounding differences between the tile matmul and the
    threshold dot product cannot rank a token below itself.
    """
    if h.ndim != 2 or W_U.ndim != 2 or h.shape[1] != W_U.shape[0]:
        raise ValueError(f"h must be [rows, d_model] and W_U [d_model, vocab]; got {tuple(h.shape)}, {tuple(W_U.shape)}")
    rows, vocab = h.shape[0], W_U.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size), got {k!r}")
    for name, value in (("vocab_chunk", vocab_chunk), ("row_chunk", row_chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
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
    has_bias = bool(b_U.any())
    out = {name: [] for name in ("ti", "tv", "bi", "bv", "rk")}
    for r0 in range(0, rows, row_chunk):
        hr, ids = h[r0:r0 + row_chunk], rank_ids[r0:r0 + row_chunk]
        n_r, m = ids.shape
        if vocab_chunk is None:
            vocab_chunk = _balanced_chunk(vocab, max(BLOCK, TILE_ELEMENTS // n_r))
        thr = torch.einsum("rd,rmd->rm", hr, WT[ids]) + b_U[ids]  # [r, m]
        counts = torch.zeros(n_r, m, dtype=torch.float64, device=h.device)
        logits = torch.empty(n_r, min(vocab_chunk, vocab), device=h.device)
        above = torch.empty_like(logits)
        ones = torch.ones(logits.shape[1], device=h.device)
        tv = ti = bv = bi = None
        for c0 in range(0, vocab, vocab_chunk):
            c1 = min(c0 + vocab_chunk, vocab)
            C = c1 - c0
            tile = torch.mm(hr, WT[c0:c1].T, out=logits[:, :C]) if C == logits.shape[1] else hr @ WT[c0:c1].T
            if has_bias:
                tile += b_U[c0:c1]
            v1, i1 = _tile_topk(tile, k, largest=True)
            v2, i2 = _tile_topk(tile, k, largest=False)
            tv, ti = _merge(tv, ti, v1, i1 + c0, k, largest=True)
            bv, bi = _merge(bv, bi, v2, i2 + c0, k, largest=False)
            for j in range(m):
                # Count logits above the threshold as a float mask times ones: a matrix-vector
                # product runs far faster on CPU than a bool reduction (exact below 2^24 per tile).
                mask = torch.gt(tile, thr[:, j:j + 1], out=above[:, :C])
                counts[:, j] += mask @ ones[:C]
            if m:
                inside = (ids >= c0) & (ids < c1)
                own = tile.gather(1, (ids - c0).clamp(0, C - 1))
                counts -= (inside & (own > thr)).double()
        for name, t in zip(("ti", "tv", "bi", "bv", "rk"), (ti, tv, bi, bv, counts.round().long())):
            out[name].append(t)
    cat = {name: torch.cat(ts) for name, ts in out.items()}
    return VocabReadout(top_ids=cat["ti"], top_logits=cat["tv"], bottom_ids=cat["bi"],
                        bottom_logits=cat["bv"], ranks=cat["rk"])


def _balanced_chunk(vocab: int, limit: int) -> int:
    """A chunk width <= ``limit`` (a multiple of BLOCK) splitting ``vocab`` into near-equal tiles."""
    n_tiles = -(-vocab // limit)
    width = -(-vocab // n_tiles)
    return min(vocab, -(-width // BLOCK) * BLOCK)


def _tile_topk(tile: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k (or bottom-k) of each row of a tile, sorted.

    Blocked: the k best elements of a row lie in the k blocks with the best block maximum (any
    element outside them is beaten by k block maxima), so one cheap ``amax``/``amin`` pass over
    the tile plus a top-k over ``k·BLOCK`` candidates replaces a full top-k pass.
    """
    r, C = tile.shape
    C0 = C - C % BLOCK
    if C0 // BLOCK < 4 * k:
        return tile.topk(min(k, C), dim=1, largest=largest)
    if C0 < C:  # ragged last tile: blocked part + the < BLOCK leftover columns, merged
        v, i = _tile_topk(tile[:, :C0], k, largest)
        v2, i2 = tile[:, C0:].topk(min(k, C - C0), dim=1, largest=largest)
        return _merge(v, i, v2, i2 + C0, k, largest)
    blocks = tile.view(r, C // BLOCK, BLOCK)
    best = blocks.amax(-1) if largest else blocks.amin(-1)
    _, bidx = best.topk(k, dim=1, largest=largest)  # [r, k] block ids
    cand = blocks.gather(1, bidx[:, :, None].expand(r, k, BLOCK)).reshape(r, k * BLOCK)
    vals, pos = cand.topk(k, dim=1, largest=largest)
    return vals, bidx.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK


def _merge(vals: Tensor | None, ids: Tensor | None, new_vals: Tensor, new_ids: Tensor, k: int,
           largest: bool) -> tuple[Tensor, Tensor]:
    """Merge a tile's candidates into the running k best (sorted)."""
    if vals is not None:
        new_vals, new_ids = torch.cat([vals, new_vals], 1), torch.cat([ids, new_ids], 1)
    kk = min(k, new_vals.shape[1])
    v, pos = new_vals.topk(kk, dim=1, largest=largest)
    return v, new_ids.gather(1, pos)


__all__ = ["VocabReadout", "vocab_readout", "l2_normalize", "TILE_ELEMENTS", "ROW_CHUNK"]
