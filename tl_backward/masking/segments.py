"""Prompt segmentation for segment-based attention masking (MAS).

A :class:`Segments` holds the exact token tensor the model will see (BOS and padding included)
and, per token, a segment id: ``k >= 0`` for bidirectional block ``k``, ``-1`` for causal tokens.
Builders:

- :func:`from_blocks` — a list of strings, one block each, then a causal answer;
- :func:`from_delimiter` — each delimiter (default ``"###"``) closes a block;
- :func:`from_chat` — each system/user message is a block; assistant turns are causal;
- :func:`from_spans` / :func:`from_ids` — explicit token spans or ids (validated).

Conventions (documented choices): BOS belongs to the first block when that block starts right
after it; padding tokens get id ``-1`` and are never attended to; ``target`` marks answer tokens
(scored by :func:`tl_backward.mas_finetune`), which must be causal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..core import checks
from ..core.adapter import decode_ids
from ..errors import TLBackwardError
from .check import mask_tensor as _mask_tensor
from .check import row_index as _row_index
from .check import span_rows as _span_rows
from .check import validate as _validate
from .rule import position_ids as _position_ids
from .rule import row_end as _row_end
from .rule import staircase_mask
from .render import mask_figure, segment_tokens

__all__ = [
    "Segments",
    "from_blocks",
    "from_delimiter",
    "from_chat",
    "from_spans",
    "from_ids",
    "concat",
    "staircase_mask",
]


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
        return decode_ids(_tokenizer(model), self.tokens[row])


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


# ------------------------------------------------------------------------------------------
# text builders
# ------------------------------------------------------------------------------------------
def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise TLBackwardError("model has no tokenizer (or is not a model); build Segments with from_ids/from_spans "
                              "instead", argument="model")
    return tok


def _bos(tok: Any, prepend_bos: bool) -> list[int]:
    if not checks.flag(prepend_bos, "prepend_bos"):
        return []
    if tok.bos_token_id is None:
        raise TLBackwardError("the tokenizer has no BOS token; pass prepend_bos=False", argument="prepend_bos")
    return [int(tok.bos_token_id)]


def _encode(tok: Any, text: str, offsets: bool = False):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = [int(i) for i in enc["input_ids"]]
    return (ids, [tuple(o) for o in enc["offset_mapping"]]) if offsets else ids


def _pad_id(tok: Any) -> int:
    for cand in (tok.pad_token_id, tok.eos_token_id, 0):
        if cand is not None:
            return int(cand)
    return 0


def _assemble(rows: list[tuple[list[int], list[int], list[bool]]], pad_id: int, padding_side: str) -> Segments:
    """Stack per-row (ids, segment ids, target) lists, padding to the longest row."""
    checks.one_of(padding_side, "padding_side", ("left", "right"))
    length = max(len(r[0]) for r in rows)
    cols = {k: [] for k in ("tokens", "seg", "valid", "target")}
    for ids, seg, tgt in rows:
        n = length - len(ids)
        pad = lambda xs, v: ([v] * n + xs) if padding_side == "left" else (xs + [v] * n)  # noqa: E731
        cols["tokens"].append(pad(ids, pad_id))
        cols["seg"].append(pad(seg, -1))
        cols["valid"].append(pad([True] * len(ids), False))
        cols["target"].append(pad(tgt, False))
    return Segments(
        torch.tensor(cols["tokens"], dtype=torch.long),
        torch.tensor(cols["seg"], dtype=torch.long),
        torch.tensor(cols["valid"], dtype=torch.bool),
        torch.tensor(cols["target"], dtype=torch.bool),
    )


def _as_batch(x: Any, inner: type, name: str) -> tuple[list, bool]:
    """Normalise a single item or a list of items; returns (items, was_batched)."""
    if isinstance(x, inner):
        return [x], False
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, (list, tuple)) for i in x):
        return list(x), True
    if isinstance(x, (list, tuple)):
        return [list(x)], False
    raise TLBackwardError(f"{name} must be a list (or a list of lists for a batch), got {type(x).__name__}",
                          argument=name)


def _answers(answer: str | Sequence[str], n: int) -> list[str]:
    if isinstance(answer, str):
        return [answer] * n
    if not isinstance(answer, (list, tuple)) or not all(isinstance(a, str) for a in answer):
        raise TLBackwardError(f"answer must be a string or a list of strings (one per prompt), got {answer!r:.40}",
                              argument="answer")
    answer = list(answer)
    if len(answer) != n:
        raise TLBackwardError(f"answer: need one string per prompt ({n}), got {len(answer)}", argument="answer")
    return answer


def from_blocks(
    model: Any,
    blocks: Sequence[str] | Sequence[Sequence[str]],
    answer: str | Sequence[str] = "",
    *,
    prepend_bos: bool = True,
    padding_side: str = "right",
) -> Segments:
    """One bidirectional block per string, then the causal ``answer`` (marked as target).

    Each string is tokenised on its own (include leading spaces yourself for BPE tokenizers, e.g.
    ``" Question: ..."``). BOS is prepended to, and belongs to, block 0. Pass a list of lists (and
    a list of answers) for a batch, padded on ``padding_side``.
    """
    tok = _tokenizer(model)
    checks.flag(prepend_bos, "prepend_bos")
    checks.one_of(padding_side, "padding_side", ("left", "right"))
    if isinstance(blocks, str):
        raise TLBackwardError("blocks must be a list of strings (one per block), not a single string",
                              argument="blocks")
    prompts, _ = _as_batch(blocks, str, "blocks")
    answers = _answers(answer, len(prompts))
    rows = []
    for b, (prompt, ans) in enumerate(zip(prompts, answers)):
        if not prompt:
            raise TLBackwardError(f"blocks[{b}] is empty: give at least one block", argument="blocks")
        ids, seg = _bos(tok, prepend_bos), []
        seg += [0] * len(ids)
        for k, text in enumerate(prompt):
            if not isinstance(text, str):
                raise TLBackwardError(f"blocks: block {k} must be a str, got {type(text).__name__}",
                                      argument="blocks")
            piece = _encode(tok, text)
            if not piece:
                raise TLBackwardError(f"blocks: block {k} ({text!r}) of prompt {b} tokenises to no tokens (empty "
                                      "segment)", argument="blocks")
            ids += piece
            seg += [k] * len(piece)
        tail = _encode(tok, ans) if ans else []
        rows.append((ids + tail, seg + [-1] * len(tail), [False] * len(ids) + [True] * len(tail)))
    return _assemble(rows, _pad_id(tok), padding_side)


def _char_spans_to_tokens(offsets: list[tuple[int, int]], ends: list[int], text: str) -> list[int]:
    """Index of the token holding character ``e - 1`` for each char end ``e``."""
    starts = torch.tensor([o[0] for o in offsets] or [0])
    out = []
    for e in ends:
        idx = int((starts < e).sum()) - 1
        if idx < 0:
            raise TLBackwardError(f"no token covers character {e - 1} of {text[:40]!r}", argument="text")
        out.append(idx)
    return out


def from_delimiter(
    model: Any,
    text: str | Sequence[str],
    delimiter: str = "###",
    *,
    answer: str | Sequence[str] = "",
    prepend_bos: bool = True,
    padding_side: str = "right",
) -> Segments:
    """Each ``delimiter`` closes a block (inclusive); the text after the last one is causal.

    Block 0 runs from BOS (or the first token) through the token that holds the last character of
    the first delimiter; block k from just after the previous delimiter through the k-th one. The
    text is tokenised once (offsets map delimiters to tokens, so it works for any fast tokenizer).
    An optional ``answer`` is appended causally and marked as target. A block holding nothing but
    its delimiter (``"the ### ### cat"``, or text starting with one) is refused as empty.
    """
    if not isinstance(delimiter, str) or not delimiter:
        raise TLBackwardError(f"delimiter must be a non-empty string, got {delimiter!r:.40}", argument="delimiter")
    tok = _tokenizer(model)
    checks.flag(prepend_bos, "prepend_bos")
    checks.one_of(padding_side, "padding_side", ("left", "right"))
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)) and text:
        texts = list(text)
    else:
        raise TLBackwardError(f"text must be a string or a non-empty list of strings, got {text!r:.40}",
                              argument="text")
    answers = _answers(answer, len(texts))
    rows = []
    for b, (t, ans) in enumerate(zip(texts, answers)):
        if not isinstance(t, str):
            raise TLBackwardError(f"text[{b}] must be a str, got {type(t).__name__}", argument="text")
        found = list(re.finditer(re.escape(delimiter), t))
        if not found:
            raise TLBackwardError(f"text[{b}] contains no delimiter {delimiter!r}: MAS needs at least one block",
                                  argument="text")
        for k, m in enumerate(found):
            if not t[found[k - 1].end() if k else 0:m.start()].strip():
                raise TLBackwardError(f"text[{b}]: block {k} holds only its delimiter {delimiter!r} (an empty "
                                      "segment); remove the extra delimiter", argument="text")
        ends = [m.end() for m in found]
        ids, offsets = _encode(tok, t, offsets=True)
        closing = _char_spans_to_tokens(offsets, ends, t)
        if len(set(closing)) != len(closing):
            raise TLBackwardError(f"text[{b}]: two delimiters fall in one token (an empty segment)",
                                  argument="text")
        head = _bos(tok, prepend_bos)
        seg = [-1] * len(ids)
        start = 0
        for k, stop in enumerate(closing):
            seg[start : stop + 1] = [k] * (stop + 1 - start)
            start = stop + 1
        tail = _encode(tok, ans) if ans else []
        rows.append((head + ids + tail, [0] * len(head) + seg + [-1] * len(tail),
                     [False] * (len(head) + len(ids)) + [True] * len(tail)))
    return _assemble(rows, _pad_id(tok), padding_side)


_BLOCK_ROLES = ("system", "user")


def _render_chat(tok: Any, messages: list[dict], generation_prompt: bool) -> str:
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    # Fallback for tokenizers without a template (GPT-2, the tiny word tokenizer).
    text = "".join(f"{m['role']} : {m['content']}\n" for m in messages)
    return text + ("assistant :" if generation_prompt else "")


def from_chat(
    model: Any,
    messages: Sequence[dict] | Sequence[Sequence[dict]],
    *,
    add_generation_prompt: bool = True,
    prepend_bos: bool = True,
    padding_side: str = "right",
) -> Segments:
    """Each system/user message (its span in the rendered chat template) is one block.

    The tokenizer's ``chat_template`` renders the conversation; a message's span is the text the
    template adds for it (header through end-of-turn). Assistant turns and the open generation
    header are causal. Tokenizers without a template use ``"role : content\\n"`` lines. BOS (from
    the template, or prepended when ``prepend_bos`` and absent) joins block 0 when block 0 starts
    the conversation.
    """
    tok = _tokenizer(model)
    checks.flag(add_generation_prompt, "add_generation_prompt")
    checks.flag(prepend_bos, "prepend_bos")
    checks.one_of(padding_side, "padding_side", ("left", "right"))
    convs, _ = _as_batch(messages, dict, "messages")
    rows = []
    for b, conv in enumerate(convs):
        if not conv:
            raise TLBackwardError(f"messages[{b}] is empty", argument="messages")
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TLBackwardError(f"messages[{b}][{i}] must be a dict with 'role' and 'content'",
                                      argument="messages")
            if not isinstance(m["role"], str) or not isinstance(m["content"], str):
                raise TLBackwardError(f"messages[{b}][{i}]: 'role' and 'content' must be strings, got "
                                      f"{type(m['role']).__name__} and {type(m['content']).__name__}",
                                      argument="messages")
        full = _render_chat(tok, list(conv), add_generation_prompt)
        bounds = [0]
        for i in range(1, len(conv) + 1):
            prefix = _render_chat(tok, list(conv[:i]), False)
            if not full.startswith(prefix):
                raise TLBackwardError("the chat template does not render conversations prefix-wise; "
                                      "build the blocks with from_blocks or from_spans instead", argument="model")
            bounds.append(len(prefix))
        ids, offsets = _encode(tok, full, offsets=True)
        starts = torch.tensor([o[0] for o in offsets])
        seg = [-1] * len(ids)
        k = 0
        for i, m in enumerate(conv):
            if m["role"] not in _BLOCK_ROLES:
                continue
            lo = int((starts < bounds[i]).sum())
            hi = int((starts < bounds[i + 1]).sum())
            if hi <= lo:
                raise TLBackwardError(f"messages[{b}][{i}] renders to no tokens (empty segment)",
                                      argument="messages")
            seg[lo:hi] = [k] * (hi - lo)
            k += 1
        bos = tok.bos_token_id
        head: list[int] = []
        if prepend_bos and not (ids and bos is not None and ids[0] == bos):
            head = _bos(tok, True)
        if ids and bos is not None and ids[0] == bos and seg[0] == -1 and len(seg) > 1 and seg[1] == 0:
            seg[0] = 0  # a template's own BOS joins block 0
        seg = [0 if seg and seg[0] == 0 else -1] * len(head) + seg
        rows.append((head + ids, seg, [False] * (len(head) + len(ids))))
    return _assemble(rows, _pad_id(tok), padding_side)
