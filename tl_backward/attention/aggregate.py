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

from torch import Tensor

from tl_backward.core import checks

from .reversed import MeanAccumulator, ReversedAttention, aligned, check_align, reversed_attention
from .targets import batch_target, check_prompts

__all__ = ["MeanAccumulator", "mean_over", "aligned"]


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
