"""Validation of :class:`~tl_backward.masking.batch.Segments` and of its builders' arguments.

Every check raises :class:`~tl_backward.errors.TLBackwardError` naming the argument (``tokens``,
``segment_ids``, ``valid``, ``target``, ``spans``, ``index``). The rules checked by
:func:`validate` are the module docstring's of tl_backward/masking/segments.py: segment ids are
``-1`` (causal) or ``0, 1, 2, ...`` in order, each block one contiguous run; padding is causal;
target (answer) tokens are real and causal; every row has a real token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import checks
from ..errors import TLBackwardError

__all__ = ["row_index", "mask_tensor", "validate", "span_rows"]


def row_index(index: Any, n: int) -> Any:
    """``index`` for :meth:`Segments.select`: an int (negative from the end), a slice, or ints."""
    if isinstance(index, slice):
        return index
    if checks.is_int(index):
        return [checks.index(index, n, "index", "row", "this batch")]
    if isinstance(index, Tensor) and index.dtype == torch.bool:
        if index.shape != (n,):
            raise TLBackwardError(f"index: a bool mask must have shape ({n},), got {tuple(index.shape)}",
                                  argument="index")
        return index
    if isinstance(index, Tensor):
        index = checks.token_tensor(index.reshape(1, -1), "index")[0].tolist() if index.numel() else []
    if not isinstance(index, (list, tuple)):
        raise TLBackwardError(f"index must be an int, a slice, a list of ints or a tensor, got "
                              f"{type(index).__name__}", argument="index")
    return [checks.index(i, n, "index", "row", "this batch") for i in index]


def mask_tensor(value: Any, name: str, shape: tuple) -> Tensor:
    """A bool ``[batch, pos]`` tensor (integer 0/1 accepted) of ``shape``."""
    value = torch.as_tensor(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(value, Tensor):
        raise TLBackwardError(f"{name} must be a bool tensor [batch, pos], got {type(value).__name__}", argument=name)
    if value.dtype != torch.bool:
        if value.is_floating_point() or value.is_complex() or (value.numel() and not bool(
                ((value == 0) | (value == 1)).all())):
            raise TLBackwardError(f"{name} must be a bool tensor (or 0/1 integers), got {value.dtype}", argument=name)
        value = value.bool()
    if value.ndim == 1:
        value = value[None]
    if tuple(value.shape) != tuple(shape):
        raise TLBackwardError(f"{name} has shape {tuple(value.shape)} but tokens have {tuple(shape)}", argument=name)
    return value


def validate(tokens: Tensor, seg: Tensor, valid: Tensor, target: Tensor) -> None:
    for name, t in (("tokens", tokens), ("segment_ids", seg), ("valid", valid), ("target", target)):
        if not isinstance(t, Tensor):
            raise TLBackwardError(f"Segments.{name} must be a torch.Tensor, got {type(t).__name__}", argument=name)
        if t.ndim != 2:
            raise TLBackwardError(f"Segments.{name} must be [batch, pos], got shape {tuple(t.shape)}", argument=name)
        if t.shape != tokens.shape:
            raise TLBackwardError(f"Segments.{name} has shape {tuple(t.shape)}, tokens {tuple(tokens.shape)}",
                                  argument=name)
    for name, t in (("tokens", tokens), ("segment_ids", seg)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TLBackwardError(f"Segments.{name} must be an integer tensor (tokens and segment_ids are "
                                  f"integer), got {t.dtype}", argument=name)
    if valid.dtype != torch.bool or target.dtype != torch.bool:
        raise TLBackwardError("Segments.valid and target must be bool tensors", argument="valid")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise TLBackwardError(f"Segments: empty tokens (shape {tuple(tokens.shape)}); pass at least one row of at "
                              "least one token", argument="tokens")
    if (tokens < 0).any():
        raise TLBackwardError("Segments.tokens holds negative token ids", argument="tokens")
    if (seg < -1).any():
        raise TLBackwardError("segment_ids must be >= -1 (-1 = causal token)", argument="segment_ids")
    if (seg[~valid] >= 0).any():
        raise TLBackwardError("padding tokens (valid=False) must have segment id -1", argument="segment_ids")
    if (target & ~valid).any():
        raise TLBackwardError("target tokens must be real tokens (valid=True)", argument="target")
    if (target & (seg >= 0)).any():
        raise TLBackwardError(
            "target (answer) tokens must be causal (segment id -1): under MAS a block token sees "
            "its own next token, so scoring it would leak the answer", argument="target")
    if not valid.any(-1).all():
        raise TLBackwardError("every row needs at least one real token (valid=True)", argument="valid")
    # Blocks: ids 0, 1, 2, ... in order of position, each one contiguous run.
    in_block = seg >= 0
    if in_block.any():
        running = torch.where(in_block, seg, torch.full_like(seg, -1)).cummax(-1).values
        if (in_block & (seg < running)).any():
            raise TLBackwardError("segment_ids must increase along the sequence (block 0 first, no overlap)",
                                  argument="segment_ids")
        prev = torch.cat([torch.full_like(seg[:, :1], -1), running[:, :-1]], 1)
        if (in_block & (seg > prev + 1)).any():
            raise TLBackwardError("segment_ids must be 0, 1, 2, ... without gaps (an empty segment?)",
                                  argument="segment_ids")
        # Contiguity: a block may not resume after another token (causal or other block).
        starts = in_block & (seg != torch.cat([torch.full_like(seg[:, :1], -2), seg[:, :-1]], 1))
        if (starts & (seg <= prev)).any():
            raise TLBackwardError("segment_ids: each segment must be one contiguous run of tokens "
                                  "(split/overlapping segment)", argument="segment_ids")


def span_rows(spans: Any, batch: int) -> list:
    """``spans`` as one list of ``(start, stop)`` pairs per row (a flat list is one row)."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, (list, tuple)):
        raise TLBackwardError(f"spans must be a list of (start, stop) pairs (one list per row for a batch), got "
                              f"{type(spans).__name__}", argument="spans")
    if spans and isinstance(spans[0], (list, tuple)) and len(spans[0]) == 2 and not isinstance(
            spans[0][0], (list, tuple)):
        spans = [spans]  # one row
    if len(spans) != batch:
        raise TLBackwardError(f"spans: need one list of (start, stop) per row ({batch}), got {len(spans)}",
                              argument="spans")
    return list(spans)
