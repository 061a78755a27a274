"""Averaging RA maps over a dataset of prompts (for attention patching and figures).

Maps of different prompts can only be averaged cell by cell if the cells mean the same thing:

* ``align="exact"`` (the reference's rule): every prompt has the same token length; cell (i, j)
  is query position i, key position j of every prompt. A mismatch raises.
* ``align="end"``: positions are counted from each prompt's last real token (-1 = last). The mean
  covers the last n positions, n = the shortest prompt, so every cell averages every prompt.

Streaming: :class:`MeanAccumulator` keeps running sums only (one set of maps), so a dataset never
has to fit in memory; :func:`mean_over` runs batches of prompts through it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from tl_backward.core import checks
from tl_backward.errors import TLBackwardError

from .reversed import ReversedAttention, reversed_attention
from .targets import batch_target, check_prompts

__all__ = ["MeanAccumulator", "mean_over", "aligned"]

ALIGNS = ("exact", "end")


def check_align(align: str) -> str:
    return checks.one_of(align, "align", ALIGNS, hint="'exact': same-length prompts; 'end': count positions "
                         "from the last token, crop to the shortest prompt")


def aligned(x: Tensor, lengths: Tensor, n: int) -> Tensor:
    """``x [..., batch, head, q, k]`` (batch at dim -4) cropped per row to the ``n × n`` block that
    ends at the row's last real token (``lengths[b]`` real tokens)."""
    rows = [x[..., b, :, int(l) - n:int(l), int(l) - n:int(l)] for b, l in enumerate(lengths)]
    return torch.stack(rows, dim=-4)


class MeanAccumulator:
    """Running element-wise sums of RA maps and patterns over results added with :meth:`add`."""

    def __init__(self, align: str = "exact"):
        self.align = check_align(align)
        self.n = 0
        self.length: int | None = None
        self.sum_maps: Tensor | None = None
        self.sum_patterns: Tensor | None = None
        self.metric = 0.0
        self.first: tuple[Tensor, list[str], Tensor] | None = None  # tokens, str_tokens, lengths of row 0
        self.layers: tuple[int, ...] | None = None
        self.scales: tuple[float, ...] | None = None
        self.n_layers: int | None = None

    def add(self, ra: ReversedAttention) -> None:
        if ra.align is not None:
            raise TLBackwardError("add per-prompt results, not means (this result is already averaged)",
                                  argument="ra")
        if self.layers is None:
            self.layers, self.scales, self.n_layers = ra.layers, ra.scales, ra.n_layers
        elif ra.layers != self.layers:
            raise TLBackwardError(f"results cover different layers: {list(ra.layers)} vs {list(self.layers)}",
                                  argument="layers")
        lengths = ra.mask.sum(1)
        if self.align == "exact":
            lens = sorted({int(l) for l in lengths} | ({self.length} if self.length else set()))
            if len(lens) > 1:
                raise TLBackwardError(
                    f"align='exact' needs prompts of one token length, got lengths {lens}: use prompts "
                    "with the same layout, or align='end' to count positions from the last token", argument="align")
            n = lens[0]
            maps, pats = ra.maps[..., :n, :n], ra.patterns[..., :n, :n]
        else:
            n = min(int(lengths.min()), self.length or 10**9)
            maps, pats = aligned(ra.maps, lengths, n), aligned(ra.patterns, lengths, n)
        maps, pats = maps.sum(1, keepdim=True), pats.sum(1, keepdim=True)
        if self.sum_maps is None:
            self.sum_maps, self.sum_patterns = maps, pats
            self.first = (ra.tokens[0], ra.str_tokens[0], lengths[0])
        else:
            if n < self.length:  # a shorter prompt arrived: keep the last n positions of the sums
                self.sum_maps = self.sum_maps[..., -n:, -n:]
                self.sum_patterns = self.sum_patterns[..., -n:, -n:]
            self.sum_maps = self.sum_maps + maps
            self.sum_patterns = self.sum_patterns + pats
        self.length = n
        self.n += ra.maps.shape[1]
        self.metric += float(ra.metric)

    def result(self) -> ReversedAttention:
        if self.n == 0:
            raise TLBackwardError("nothing to average: add at least one result", argument="prompts")
        n = self.length
        tokens, str_tokens, length = self.first
        start = int(length) - n  # exact: 0 (all prompts share the length)
        return ReversedAttention(
            maps=self.sum_maps / self.n, patterns=self.sum_patterns / self.n, layers=self.layers,
            scales=self.scales, tokens=tokens[start:start + n][None].clone(),
            mask=torch.ones(1, n, dtype=torch.bool), last=torch.tensor([n - 1]),
            str_tokens=[list(str_tokens[start:start + n])], metric=torch.tensor(self.metric / self.n),
            n_examples=self.n, align=self.align, n_layers=self.n_layers,
        )


def mean_over(
    model: Any,
    prompts: Sequence[str] | Tensor,
    target: Any = None,
    *,
    metric: Any = None,
    layers: int | Sequence[int] | None = None,
    align: str = "exact",
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    progress: bool = False,
) -> ReversedAttention:
    """Mean RA maps and mean forward patterns over a dataset of prompts, streamed in batches.

    ``target``: one target for every prompt, or a list with one per prompt (strings or token ids);
    or pass ``metric`` (applied to every batch). ``align``: see the module docstring. Returns a
    :class:`ReversedAttention` with batch 1 (``n_examples`` prompts averaged), ready for
    :func:`tl_backward.patch_attention` (RA) or, with ``.patterns``, the forward-attention control.
    """
    check_align(align)
    n = check_prompts(prompts, batch_size)
    checks.flag(progress, "progress")
    acc = MeanAccumulator(align)
    from tqdm.auto import tqdm

    with tqdm(total=n, desc="mean RA", disable=not progress, leave=False) as bar:
        for i in range(0, n, batch_size):
            chunk = prompts[i:i + batch_size]
            tgt, met = batch_target(target, metric, n, i, i + batch_size, "target")
            acc.add(reversed_attention(model, chunk, tgt, metric=met, layers=layers, prepend_bos=prepend_bos))
            bar.update(len(chunk))
    return acc.result()
