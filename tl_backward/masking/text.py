"""Text builders for MAS :class:`~tl_backward.masking.batch.Segments` (one block per piece of text).

- :func:`from_blocks` — a list of strings, one block each, then a causal answer;
- :func:`from_delimiter` — each delimiter (default ``"###"``) closes a block;
- :func:`from_chat` — each system/user message is a block; assistant turns are causal.

Tokenisation goes through ``tl_backward/core/tokens.py`` (the adapter's path), so any object with
a ``.tokenizer`` works. Conventions: BOS belongs to the first block when that block starts right
after it; padding gets segment id ``-1`` and is never attended to; ``target`` marks answer tokens
(scored by :func:`tl_backward.mas_finetune`), which are causal.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from ..core import checks
from ..core.tokens import bos_prefix, encode_text, pad_token_id
from ..errors import TLBackwardError
from .batch import Segments, tokenizer_of

__all__ = ["from_blocks", "from_delimiter", "from_chat"]


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
    tok = tokenizer_of(model)
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
        ids, seg = bos_prefix(tok, prepend_bos), []
        seg += [0] * len(ids)
        for k, text in enumerate(prompt):
            if not isinstance(text, str):
                raise TLBackwardError(f"blocks: block {k} must be a str, got {type(text).__name__}",
                                      argument="blocks")
            piece = encode_text(tok, text)
            if not piece:
                raise TLBackwardError(f"blocks: block {k} ({text!r}) of prompt {b} tokenises to no tokens (empty "
                                      "segment)", argument="blocks")
            ids += piece
            seg += [k] * len(piece)
        tail = encode_text(tok, ans) if ans else []
        rows.append((ids + tail, seg + [-1] * len(tail), [False] * len(ids) + [True] * len(tail)))
    return _assemble(rows, pad_token_id(tok), padding_side)


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
    tok = tokenizer_of(model)
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
        ids, offsets = encode_text(tok, t, offsets=True)
        closing = _char_spans_to_tokens(offsets, ends, t)
        if len(set(closing)) != len(closing):
            raise TLBackwardError(f"text[{b}]: two delimiters fall in one token (an empty segment)",
                                  argument="text")
        head = bos_prefix(tok, prepend_bos)
        seg = [-1] * len(ids)
        start = 0
        for k, stop in enumerate(closing):
            seg[start : stop + 1] = [k] * (stop + 1 - start)
            start = stop + 1
        tail = encode_text(tok, ans) if ans else []
        rows.append((head + ids + tail, [0] * len(head) + seg + [-1] * len(tail),
                     [False] * (len(head) + len(ids)) + [True] * len(tail)))
    return _assemble(rows, pad_token_id(tok), padding_side)


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
    tok = tokenizer_of(model)
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
        ids, offsets = encode_text(tok, full, offsets=True)
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
            head = bos_prefix(tok, True)
        if ids and bos is not None and ids[0] == bos and seg[0] == -1 and len(seg) > 1 and seg[1] == 0:
            seg[0] = 0  # a template's own BOS joins block 0
        seg = [0 if seg and seg[0] == 0 else -1] * len(head) + seg
        rows.append((head + ids, seg, [False] * (len(head) + len(ids))))
    return _assemble(rows, pad_token_id(tok), padding_side)
