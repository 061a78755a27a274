"""Pictures of MAS: which tokens form blocks, the keep-mask, and the attention it produces.

Inputs are tensors and token strings, never a model run (the page that runs the model is
:func:`tl_backward.masking.experiment.mas_page`). Every token is escaped.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import TLBackwardError
from ..render.figures import attention_heads, attention_pattern
from ..render.page import Figure, escape, html_figure

__all__ = ["mask_figure", "patterns_figure", "row_tokens", "segment_tokens"]

# Block colours (cycled); causal tokens are grey, padding is not shown.
_BLOCK_COLOURS = ("#cfe2ff", "#ffe0b3", "#d4f0d4", "#f3d1f4", "#fff3b0", "#d1ecf1")
_CAUSAL = "#e9ecef"


def _row(segments: Any, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0 <= row < len(segments):
        raise TLBackwardError(f"row must be in 0..{len(segments) - 1}, got {row}", argument="row")
    valid = segments.valid[row].cpu()
    return valid, segments.segment_ids[row].cpu()


def row_tokens(segments: Any, tokens: Any, row: int) -> list[str]:
    """Token strings of the real tokens of ``row`` (``tokens``: a model or a list of strings)."""
    valid = segments.valid[row].cpu()
    if isinstance(tokens, (list, tuple)):
        toks = [str(t) for t in tokens]
        if len(toks) == len(valid):
            toks = [t for t, v in zip(toks, valid.tolist()) if v]
        if len(toks) != int(valid.sum()):
            raise TLBackwardError(f"tokens has {len(toks)} strings; row {row} has {int(valid.sum())} real tokens",
                                  argument="tokens")
        return toks
    return [t for t, v in zip(segments.str_tokens(tokens, row), valid.tolist()) if v]


def segment_tokens(segments: Any, tokens: Any, *, row: int = 0, title: str | None = "MAS segments") -> Figure:
    """The prompt with each block on its own background colour (causal tokens grey)."""
    valid, ids = _row(segments, row)
    toks = row_tokens(segments, tokens, row)
    spans = []
    for tok, sid in zip(toks, ids[valid].tolist()):
        colour = _CAUSAL if sid < 0 else _BLOCK_COLOURS[sid % len(_BLOCK_COLOURS)]
        label = "causal" if sid < 0 else f"block {sid}"
        spans.append(f'<span class="tlb-tok" style="background:{colour};padding:1px 3px;margin:1px;'
                     f'border-radius:3px;display:inline-block" title="{escape(label)}">{escape(tok)}</span>')
    legend = " ".join(
        f'<span style="background:{_BLOCK_COLOURS[k % len(_BLOCK_COLOURS)]};padding:1px 4px">block {k}</span>'
        for k in range(int(ids.max()) + 1)
    ) + f' <span style="background:{_CAUSAL};padding:1px 4px">causal</span>'
    return html_figure(f'<div style="line-height:2">{"".join(spans)}</div><div>{legend}</div>', title=title)


def mask_figure(segments: Any, tokens: Any, *, row: int = 0, title: str | None = "MAS keep-mask") -> Figure:
    """The keep-mask of one row over its real tokens (1 = may attend), upper triangle shown."""
    valid, _ = _row(segments, row)
    keep = segments.mask()[row, 0].cpu()[valid][:, valid].float()
    return attention_pattern(keep, row_tokens(segments, tokens, row), mask_upper_tri=False, title=title)


def patterns_figure(patterns: Any, tokens: Sequence[str], *, title: str | None = None,
                    head_names: Sequence[str] | None = None) -> Figure:
    """Attention patterns ``Float[head, query_pos, key_pos]`` with the future triangle visible."""
    return attention_heads(patterns, list(tokens), head_names=head_names, mask_upper_tri=False, title=title)
