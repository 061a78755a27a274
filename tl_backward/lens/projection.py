"""Backward Lens's view of the readout: top-k, bottom-k and ranks of already-normed vectors.

A thin layer over :mod:`tl_backward.core.readout` (the one chunked logit-lens readout):
``logits = h @ W_U + b_U`` for ``h`` that already went through the final norm, one
``[row_chunk, vocab_chunk]`` tile at a time. Rank convention (as TransformerLens's
``target_ranks``): rank(t) = #{k : logit_k > logit_t}, so 0 is the most probable token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_backward.core.readout import ROW_CHUNK, TILE_ELEMENTS, Unembed, as_targets
from tl_backward.core.readout import normalize_rows as l2_normalize
from tl_backward.errors import TLBackwardError


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
    """Top-k / bottom-k tokens and ranks of ``rank_ids`` for ``logits = h @ W_U + b_U``
    (:meth:`tl_backward.core.readout.Unembed.readout` without a final norm).

    ``h`` is already normalised (``ln_final``). Memory: two ``[row_chunk, vocab_chunk]`` fp32 tiles;
    the full ``[rows, vocab]`` logits never exist. Ranks count strictly larger logits.
    """
    if h.ndim != 2 or W_U.ndim != 2 or h.shape[1] != W_U.shape[0]:
        raise TLBackwardError(f"h must be [rows, d_model] and W_U [d_model, vocab]; got {tuple(h.shape)}, "
                              f"{tuple(W_U.shape)}", argument="h")
    if rank_ids is not None and (not isinstance(rank_ids, Tensor) or rank_ids.ndim != 2):
        raise TLBackwardError(f"rank_ids must be [{h.shape[0]}, m], got "
                              f"{tuple(rank_ids.shape) if isinstance(rank_ids, Tensor) else rank_ids!r}",
                              argument="rank_ids")
    ids = None if rank_ids is None else as_targets(rank_ids, h.shape[0], W_U.shape[1], argument="rank_ids")
    r = Unembed(W_U, b_U).readout(h, k=k, targets=ids, vocab_chunk=vocab_chunk, row_chunk=row_chunk)
    return VocabReadout(top_ids=r.top_ids, top_logits=r.top_logits, bottom_ids=r.bottom_ids,
                        bottom_logits=r.bottom_logits, ranks=r.ranks)


__all__ = ["VocabReadout", "vocab_readout", "l2_normalize", "TILE_ELEMENTS", "ROW_CHUNK"]
