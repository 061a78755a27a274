"""The :class:`Segments` batch type and its explicit constructors (MAS).

A :class:`Segments` holds the exact token tensor the model will see (BOS and padding included)
and, per token, a segment id: ``k >= 0`` for bidirectional block ``k``, ``-1`` for causal tokens.
Here: the type, :func:`concat` (re-batching) and :func:`from_ids` / :func:`from_spans` (explicit
token ids or spans, validated). The text builders live in ``tl_backward/masking/text.py``; users
reach both through ``tl_backward.segments`` (``tl_backward/masking/segments.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..core import checks
from ..core.tokens import decode_ids
from ..errors import TLBackwardError
from .check import mask_tensor as _mask_tensor
from .check import row_index as _row_index
from .check import span_rows as _span_rows
from .check import validate as _validate
from .render import mask_figure, segment_tokens
from .rule import position_ids as _position_ids
from .rule import row_end as _row_end
from .rule import staircase_mask

__all__ = ["Segments", "concat", "from_ids", "from_spans", "tokenizer_of"]


def tokenizer_of(model: Any) -> Any:
    """``model.tokenizer``, refusing objects without one (Segments need text -> ids)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise TLBackwardError("model has no tokenizer (or is not a model); build Segments with from_ids/from_spans "
                              "instead", argument="model")
    return tok


@dataclass(frozen=True)
class Segments:
    """A batch of segmented prompts.

    Attributes:
        tokens: Int[Tensor, "batch pos"] — token ids exactly as fed to the model.
        segment_ids: Int[Tensor, "batch pos"] — block id (``>= 0``) or ``-1`` (causal / pad).
        valid: Bool[Tensor, "batch pos"] — real tokens (False = padding, never attended to).
        target: Bool[Tensor, "batch pos"] — answer tokens to score in fine-tuning (causal only).
    """

    tokens: Int[Tensor, "batch pos"]
    segment_ids: Int[Tensor, "batch pos"]
    valid: Bool[Tensor, "batch pos"]
    target: Bool[Tensor, "batch pos"]

    def __repr__(self) -> str:
        B, T = self.tokens.shape
        blocks = int(self.segment_ids.max()) + 1 if self.segment_ids.numel() else 0
        return (f"Segments(batch {B} × {T} tokens, {int(self.valid.sum())} real, up to {blocks} blocks per row, "
                f"{int(self.target.sum())} target tokens)")

    def __post_init__(self) -> None:
        _validate(self.tokens, self.segment_ids, self.valid, self.target)

    # -- shape -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    # -- the mask ----------------------------------------------------------------------------
    @cached_property
    def row_end(self) -> Int[Tensor, "batch pos"]:
        """Last key position each query may see (staircase form of the rule; cached, O(batch·pos))."""
        return _row_end(self.segment_ids)

    @cached_property
    def position_ids(self) -> Int[Tensor, "batch pos"]:
        """``(cumsum(valid) - 1).clamp(min=0)``: correct positions under left or right padding."""
        return _position_ids(self.valid)

    def mask(self, q_len: int | None = None) -> Bool[Tensor, "batch 1 query_pos key_pos"]:
        """4-D bool keep-mask (True = may attend) for the Bridge's ``attention_mask=``."""
        return staircase_mask(self.row_end, self.valid, q_len)

    @property
    def left_padded(self) -> bool:
        """True if some row has a pad token before one of its real tokens."""
        real_at_or_after = self.valid.flip(-1).long().cummax(-1).values.flip(-1).bool()
        return bool((~self.valid & real_at_or_after).any())

    @property
    def n_blocks(self) -> Int[Tensor, " batch"]:
        return (self.segment_ids.max(-1).values + 1).clamp(min=0)

    def spans(self, row: int = 0) -> list[tuple[int, int]]:
        """Half-open ``(start, stop)`` token spans of the blocks of one row."""
        ids = self.segment_ids[checks.index(row, len(self), "row", "row", "this batch")]
        out = []
        for k in range(int(ids.max().item()) + 1):
            where = (ids == k).nonzero().flatten()
            out.append((int(where[0]), int(where[-1]) + 1))
        return out

    # -- derived segmentations --------------------------------------------------------------
    def causal(self) -> "Segments":
        """Same tokens, padding and targets, every segment id -1: the plain causal baseline."""
        return Segments(self.tokens, torch.full_like(self.segment_ids, -1), self.valid, self.target)

    def append(self, tokens: Int[Tensor, "batch new"], valid: Bool[Tensor, "batch new"] | None = None,
               target: bool = False) -> "Segments":
        """Append causal columns (generated or answer tokens) to every row."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.shape[0] != len(self):
            shown = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise TLBackwardError(f"tokens must be a tensor [batch={len(self)}, new], got {shown}", argument="tokens")
        tokens = checks.token_tensor(tokens, "tokens").to(self.device)
        valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else _mask_tensor(valid, "valid",
                                                                                            tokens.shape)
        valid = valid.to(self.device)
        checks.flag(target, "target")
        return Segments(
            torch.cat([self.tokens, tokens], 1),
            torch.cat([self.segment_ids, torch.full_like(tokens, -1)], 1),
            torch.cat([self.valid, valid], 1),
            torch.cat([self.target, valid & target], 1),
        )

    def select(self, index: Any) -> "Segments":
        """Rows ``index`` (int, slice, list or tensor), with columns that are padding in every
        selected row dropped from both ends."""
        index = _row_index(index, len(self))
        sub = [t[index] for t in (self.tokens, self.segment_ids, self.valid, self.target)]
        cols = sub[2].any(0).nonzero().flatten()
        if cols.numel() == 0:
            raise TLBackwardError("select: the selected rows contain no real tokens", argument="index")
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        return Segments(*(t[:, lo:hi] for t in sub))

    def to(self, device: Any) -> "Segments":
        return Segments(*(t.to(device) for t in (self.tokens, self.segment_ids, self.valid, self.target)))

    def render(self, model: Any, row: int = 0) -> Any:
        """Figure of one row: the blocks (coloured tokens) and the keep-mask. ``model`` gives the
        token strings (or pass a list of strings)."""
        return segment_tokens(self, model, row=row) + mask_figure(self, model, row=row)

    def str_tokens(self, model: Any, row: int = 0) -> list[str]:
        return decode_ids(tokenizer_of(model), self.tokens[row])


def concat(items: Sequence[Segments], *, padding_side: str = "right", pad_id: int = 0) -> Segments:
    """Stack the rows of several Segments into one batch, re-padded to the longest row.

    Each row keeps its span from its first to its last real token; padding (id ``pad_id``, never
    attended to) is added on ``padding_side``.
    """
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(s, Segments) for s in items):
        raise TLBackwardError("concat needs items, a non-empty list of Segments", argument="items")
    checks.one_of(padding_side, "padding_side", ("left", "right"))
    checks.count(pad_id, "pad_id", hint="a token id, never attended to")
    rows = []
    for s in items:
        cols = torch.arange(s.tokens.shape[1])
        for b in range(len(s)):
            real = cols[s.valid[b].cpu()]
            lo, hi = int(real[0]), int(real[-1]) + 1
            rows.append(tuple(t[b, lo:hi].cpu() for t in (s.tokens, s.segment_ids, s.valid, s.target)))
    length = max(r[0].shape[0] for r in rows)
    fills = (pad_id, -1, False, False)
    out = []
    for k, fill in enumerate(fills):
        padded = []
        for r in rows:
            pad = torch.full((length - r[k].shape[0],), fill, dtype=r[k].dtype)
            padded.append(torch.cat([pad, r[k]] if padding_side == "left" else [r[k], pad]))
        out.append(torch.stack(padded))
    return Segments(*out)


# ------------------------------------------------------------------------------------------
# explicit constructors
# ------------------------------------------------------------------------------------------
def from_ids(
    tokens: Int[Tensor, "batch pos"],
    segment_ids: Int[Tensor, "batch pos"],
    valid: Bool[Tensor, "batch pos"] | None = None,
    target: Bool[Tensor, "batch pos"] | None = None,
) -> Segments:
    """Segments from explicit per-token ids (validated; ``valid`` defaults to all real).

    ``tokens`` and ``segment_ids`` are integer tensors ``[batch, pos]`` (or ``[pos]`` for one row)
    of the same shape; ``valid``/``target`` are bool (or 0/1) tensors of that shape.
    """
    tokens = checks.token_tensor(tokens, "tokens")
    seg = torch.as_tensor(segment_ids) if isinstance(segment_ids, (list, tuple)) else segment_ids
    if not isinstance(seg, Tensor) or seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool:
        shown = seg.dtype if isinstance(seg, Tensor) else type(seg).__name__
        raise TLBackwardError(f"segment_ids must be an integer tensor [batch, pos], got {shown}",
                              argument="segment_ids")
    seg = seg[None] if seg.ndim == 1 else seg
    if tuple(seg.shape) != tuple(tokens.shape):
        raise TLBackwardError(f"segment_ids has shape {tuple(seg.shape)} but tokens have {tuple(tokens.shape)}",
                              argument="segment_ids")
    seg = seg.to(tokens.device).long()
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else _mask_tensor(valid, "valid", tokens.shape)
    target = torch.zeros_like(valid) if target is None else _mask_tensor(target, "target", tokens.shape)
    return Segments(tokens, seg, valid.to(tokens.device), target.to(tokens.device))


def from_spans(
    tokens: Int[Tensor, "batch pos"],
    spans: Sequence[tuple[int, int]] | Sequence[Sequence[tuple[int, int]]],
    *,
    valid: Bool[Tensor, "batch pos"] | None = None,
    target: Bool[Tensor, "batch pos"] | None = None,
) -> Segments:
    """Segments from half-open token spans ``(start, stop)`` per row (one list for a single row).

    Raises :class:`~tl_backward.errors.TLBackwardError` for non-int bounds, out-of-range, empty,
    unordered/overlapping spans or spans on padding.
    """
    tokens = checks.token_tensor(tokens, "tokens")
    batch, length = tokens.shape
    seg = torch.full((batch, length), -1, dtype=torch.long)
    for b, row in enumerate(_span_rows(spans, batch)):
        if not isinstance(row, (list, tuple)):
            raise TLBackwardError(f"spans[{b}] must be a list of (start, stop) pairs, got {type(row).__name__}",
                                  argument="spans")
        prev_stop = 0
        for k, span in enumerate(row):
            if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(map(checks.is_int, span))):
                raise TLBackwardError(f"spans[{b}][{k}] must be a pair of ints (start, stop), got {span!r:.40}",
                                      argument="spans")
            start, stop = int(span[0]), int(span[1])
            where = f"spans[{b}][{k}]=({start}, {stop})"
            if start < 0 or stop > length:
                raise TLBackwardError(f"{where} is out of range for {length} tokens", argument="spans")
            if stop <= start:
                raise TLBackwardError(f"{where} is empty (stop must exceed start)", argument="spans")
            if start < prev_stop:
                raise TLBackwardError(f"{where} overlaps or precedes the previous span (spans must be sorted)",
                                      argument="spans")
            seg[b, start:stop] = k
            prev_stop = stop
    if valid is not None and (seg[~_mask_tensor(valid, "valid", tokens.shape).cpu()] >= 0).any():
        raise TLBackwardError("spans cover padding tokens (valid=False)", argument="spans")
    return from_ids(tokens, seg.to(tokens.device), valid, target)

