"""The flow graphs' view of the readout: logit-lens statistics of many node vectors at once.

LL(v) = softmax(ln_final(v) · W_U + b_U) with the real final norm (gain and bias), computed by the
one chunked readout of :mod:`tl_backward.core.readout`: per vector, top-k and bottom-k tokens with
probabilities, the entropy in bits, and the target's probability and ranks. No per-node Python
loop touches the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_backward.core.readout import ROW_CHUNK, Unembed, normalize_rows
from tl_backward.errors import TLBackwardError


@dataclass(frozen=True)
class Projection:
    """Per-vector logit-lens statistics (n vectors, vocabulary V).

    ``top_ids/top_probs``: the k most probable tokens; ``bottom_ids/bottom_probs``: the k least
    probable (least first). ``rank``: #tokens strictly more probable than the target (0-based);
    ``bottom_rank``: #tokens strictly less probable. ``entropy``: bits.
    """

    top_ids: Int[Tensor, "n k"]
    top_probs: Float[Tensor, "n k"]
    bottom_ids: Int[Tensor, "n k"]
    bottom_probs: Float[Tensor, "n k"]
    target_prob: Float[Tensor, " n"]
    rank: Int[Tensor, " n"]
    bottom_rank: Int[Tensor, " n"]
    entropy: Float[Tensor, " n"]

    def __repr__(self) -> str:
        ranks = f", target rank {int(self.rank.min())}–{int(self.rank.max())}" if self.rank.numel() else ""
        return f"Projection({self.top_ids.shape[0]} vectors, top/bottom {self.top_ids.shape[1]}{ranks})"


@torch.no_grad()
def project(adapter, vectors: Float[Tensor, "n d_model"], target: int, k: int = 5, normalize: bool = False, *,
            vocab_chunk: int | None = None, row_chunk: int = ROW_CHUNK) -> Projection:
    """Logit-lens statistics of each row of ``vectors`` (see :class:`Projection`); ``k`` is capped
    at the vocabulary size, ``normalize`` L2-normalises rows first
    (:func:`~tl_backward.core.readout.normalize_rows`). Results are on the CPU."""
    if not isinstance(vectors, Tensor) or vectors.ndim != 2 or vectors.shape[-1] != adapter.d_model:
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise TLBackwardError(f"vectors must be [n, d_model={adapter.d_model}], got {shape}", argument="vectors")
    r = Unembed.of(adapter).readout(vectors, k=min(k, adapter.d_vocab), targets=target, softmax=True,
                                    bottom_ranks=True, normalize=normalize, vocab_chunk=vocab_chunk,
                                    row_chunk=row_chunk).to("cpu")
    return Projection(top_ids=r.top_ids, top_probs=r.top_probs, bottom_ids=r.bottom_ids,
                      bottom_probs=r.bottom_probs, target_prob=r.target_probs[:, 0], rank=r.ranks[:, 0],
                      bottom_rank=r.bottom_ranks[:, 0], entropy=r.entropy)


__all__ = ["Projection", "project", "normalize_rows"]
