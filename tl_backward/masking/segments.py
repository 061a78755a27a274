"""Prompt segmentation for segment-based attention masking (MAS): the public namespace
``tl_backward.segments``.

A :class:`Segments` holds the exact token tensor the model will see (BOS and padding included)
and, per token, a segment id: ``k >= 0`` for bidirectional block ``k``, ``-1`` for causal tokens.
Builders:

- :func:`from_blocks` — a list of strings, one block each, then a causal answer;
- :func:`from_delimiter` — each delimiter (default ``"###"``) closes a block;
- :func:`from_chat` — each system/user message is a block; assistant turns are causal;
- :func:`from_spans` / :func:`from_ids` — explicit token spans or ids (validated).

Where they live: the type, :func:`concat` and the explicit constructors in
``tl_backward/masking/batch.py``; the text builders in ``tl_backward/masking/text.py``; the mask
rule (:func:`staircase_mask`) in ``tl_backward/masking/rule.py``.

Conventions (documented choices): BOS belongs to the first block when that block starts right
after it; padding tokens get id ``-1`` and are never attended to; ``target`` marks answer tokens
(scored by :func:`tl_backward.mas_finetune`), which must be causal.
"""

from __future__ import annotations

from .batch import Segments, concat, from_ids, from_spans
from .rule import staircase_mask
from .text import from_blocks, from_chat, from_delimiter

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
