"""The MAS mask rule as pure tensor math (no model, no hooks).

Every token ``t`` has a segment id ``S(t)``: ``k >= 0`` for a member of bidirectional block ``k``,
``-1`` for a causal-only token (BOS outside a block, answer, generated tokens, padding). Query ``i``
may attend to key ``j`` iff

    (j <= i  or  S(i) = S(j) >= 0)  and  key_valid(j).

Blocks are contiguous, so this is a *staircase*: ``allowed(i, j) <=> j <= row_end(i) and
key_valid(j)``, where ``row_end(i)`` is the last position of i's block (``i`` itself for a causal
token). One broadcast comparison builds the whole batched mask, and the same expression is a
FlexAttention ``mask_mod``.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..core import checks
from ..errors import TLBackwardError


def row_end(segment_ids: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Last position each query may see: the end of its block, or itself if causal.

    ``row_end[b, i] = max{j : S[b, j] = S[b, i]}`` if ``S[b, i] >= 0`` else ``i``. Vectorised with a
    scatter-max over block ids (slot 0 collects the causal tokens and is ignored).
    """
    if segment_ids.ndim != 2:
        raise TLBackwardError(f"segment_ids must be [batch, pos], got shape {tuple(segment_ids.shape)}",
                              argument="segment_ids")
    batch, length = segment_ids.shape
    pos = torch.arange(length, device=segment_ids.device).expand(batch, length)
    n_slots = int(segment_ids.max().item()) + 2 if segment_ids.numel() else 1
    last = torch.full((batch, max(n_slots, 1)), -1, dtype=torch.long, device=segment_ids.device)
    slot = (segment_ids.long() + 1).clamp(min=0)
    last.scatter_reduce_(1, slot, pos, reduce="amax")
    return torch.where(segment_ids >= 0, last.gather(1, slot), pos)


def staircase_mask(
    row_end: Int[Tensor, "batch key_pos"],
    key_valid: Bool[Tensor, "batch key_pos"],
    q_len: int | None = None,
) -> Bool[Tensor, "batch 1 query_pos key_pos"]:
    """Keep-mask ``kv <= row_end[b, q] & key_valid[b, kv]`` (True = may attend).

    Queries are the last ``q_len`` positions (all of them by default), indexed by *absolute*
    position so a cached prefill or decode step uses the right rows.
    """
    if row_end.shape != key_valid.shape or row_end.ndim != 2:
        raise TLBackwardError(
            f"row_end and key_valid must both be [batch, pos]; got {tuple(row_end.shape)} "
            f"and {tuple(key_valid.shape)}", argument="key_valid")
    length = row_end.shape[1]
    q_len = length if q_len is None else checks.count(q_len, "q_len", minimum=1, maximum=length,
                                                       hint="the number of query rows")
    keys = torch.arange(length, device=row_end.device)
    rows = row_end[:, length - q_len :]
    keep = keys[None, None, :] <= rows[:, :, None]
    keep &= key_valid[:, None, :].bool()
    return keep[:, None]


def position_ids(valid: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counting real tokens only, ``(cumsum(valid) - 1).clamp(min=0)``.

    Needed with left padding: the Bridge derives positions only from 2-D masks.
    """
    return (valid.long().cumsum(-1) - 1).clamp(min=0)
