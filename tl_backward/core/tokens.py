"""The one tokenisation path below :class:`tl_backward.core.adapter.ModelAdapter`.

Plain functions of a Hugging Face tokenizer (or ``None``), so code that has only a tokenizer
(e.g. the MAS text builders in ``tl_backward/masking/text.py`` given any object with a
``.tokenizer``) and the adapter's own methods encode, decode and pad identically.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import checks


def encode_text(tokenizer: Any, text: str, *, offsets: bool = False):
    """Token ids of ``text`` without special tokens (no BOS/EOS added).

    Returns ``list[int]``, or ``(ids, offsets)`` with ``offsets[i] = (char_start, char_end)`` of
    token ``i`` in ``text`` when ``offsets=True`` (needs a fast tokenizer).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    ids = [int(i) for i in enc["input_ids"]]
    return (ids, [tuple(o) for o in enc["offset_mapping"]]) if offsets else ids


def bos_prefix(tokenizer: Any, prepend_bos: bool) -> list[int]:
    """``[bos_token_id]`` when ``prepend_bos`` (a bool), else ``[]``; refuses a tokenizer without BOS."""
    if not checks.flag(prepend_bos, "prepend_bos"):
        return []
    if tokenizer.bos_token_id is None:
        raise TLBackwardError("the tokenizer has no BOS token; pass prepend_bos=False", argument="prepend_bos")
    return [int(tokenizer.bos_token_id)]


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0 (also without a tokenizer)."""
    for cand in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if cand is not None:
            return int(cand)
    return 0


def decode_ids(tokenizer: Any, ids: Sequence[int] | Tensor) -> list[str]:
    """The one token-id decoder: each id on its own, ``tokenizer.decode([id])`` (through
    ``batch_decode`` when the tokenizer has it: one call for many ids), or ``str(id)`` without a
    tokenizer. ``ids``: any shape of tensor (flattened) or a sequence of ints."""
    flat = [int(i) for i in (ids.reshape(-1).tolist() if isinstance(ids, Tensor) else ids)]
    if tokenizer is None:
        return [str(i) for i in flat]
    if not flat:
        return []
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode([[i] for i in flat]))
    return [tokenizer.decode([i]) for i in flat]
