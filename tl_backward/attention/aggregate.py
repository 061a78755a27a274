"""Averaging RA maps over a dataset of prompts (for attention patching and figures).

Maps of different prompts can only be averaged cell by cell if the cells mean the same thing:

* ``align="exact"`` (the reference's rule): every prompt has the same token length; cell (i, j)
  is query position i, key position j of every prompt. A mismatch raises.
* ``align="end"``: positions are counted from each prompt's last real token (-1 = last). The mean
  covers the last n positions, n = the shortest prompt, so every cell averages every prompt.

Streaming: :class:`MeanAccumulator` keeps running sums only (one set of maps), so a dataset never
has to fit in memory; :func:`mean_over` sums each batch with it and adds the batches' float64 sums
on the dataset sweep (core/sweep.py): any iterable of prompts, sharded under ``torchrun``,
resumable with ``checkpoint=``. With ``align="end"`` two partial sums are merged by cropping both
to the shorter one's last n positions, then adding (within a rank and, gathered, across ranks).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.sweep import Sums, dataset_size, run_sweep
from tl_backward.errors import TLBackwardError

from .reversed import MeanAccumulator, ReversedAttention, aligned, check_align, reversed_attention
from .targets import describe, example_batches

__all__ = ["MeanAccumulator", "mean_over", "aligned"]


def mean_over(
    model: Any,
    prompts: Sequence[str] | Tensor | Iterable[Any],
    target: Any = None,
    *,
    metric: Any = None,
    layers: int | Sequence[int] | None = None,
    align: str = "exact",
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
) -> ReversedAttention:
    """Mean RA maps and mean forward patterns over a dataset of prompts, streamed in batches.

    ``prompts``: a list of strings or token ids ``[n, pos]``, or any iterable of examples (strings,
    ``(prompt, target)`` pairs, ``{"prompt", "target"}`` mappings), drawn ``batch_size`` at a time.
    ``target``: one target for every prompt, or a list with one per prompt (strings or token ids);
    or pass ``metric`` (applied to every batch). ``align``: see the module docstring. Returns a
    :class:`ReversedAttention` with batch 1 (``n_examples`` prompts averaged), ready for
    :func:`tl_backward.patch_attention` (RA) or, with ``.patterns``, the forward-attention control.
    Sums are float64; under ``torchrun`` every rank returns the same mean; ``checkpoint=path``
    makes the run resumable.
    """
    check_align(align)
    checks.flag(progress, "progress")
    layer_ids = tuple(get_adapter(model).layers(layers))

    def step(batch: tuple[int, tuple[Any, Any, Any]]) -> tuple[Sums, int, list]:
        k, (chunk, tgt, met) = batch
        ra = reversed_attention(model, chunk, tgt, metric=met, layers=layer_ids, prepend_bos=prepend_bos)
        acc = MeanAccumulator(align)
        acc.add(ra)  # this batch's sums (cropped to its shortest prompt under "end")
        sums = {"maps": acc.sum_maps.double(), "patterns": acc.sum_patterns.double(),
                "metric": torch.tensor(acc.metric, dtype=torch.float64)}
        tokens, str_tokens, length = acc.first
        first = [] if k else [{"tokens": tokens.clone(), "str_tokens": list(str_tokens), "length": int(length),
                               "layers": list(ra.layers), "scales": [float(x) for x in ra.scales],
                               "n_layers": ra.n_layers, "dtype": str(ra.maps.dtype).removeprefix("torch.")}]
        return sums, ra.maps.shape[1], first

    fingerprint = (f"mean_over {getattr(model.cfg, 'model_name', '?')} layers={list(layer_ids)} align={align} "
                   f"batch_size={batch_size} prepend_bos={prepend_bos} target={describe(target)} "
                   f"metric={describe(metric)}")
    swept = run_sweep(enumerate(example_batches(prompts, target, metric, batch_size)), step,
                      fingerprint=fingerprint, checkpoint=checkpoint, progress=progress, desc="mean RA",
                      total=dataset_size(prompts), combine=lambda a, b: _cropped_sum(a, b, align))
    return _mean(swept.sums, swept.count, swept.records[0], align)


def _cropped_sum(a: Sums, b: Sums, align: str) -> Sums:
    """Two partial sums of maps merged: both cropped to the last n positions of the shorter, added."""
    n, m = a["maps"].shape[-1], b["maps"].shape[-1]
    if n != m and align == "exact":
        raise TLBackwardError(f"align='exact' needs prompts of one token length, got lengths {sorted({n, m})}: use "
                              "prompts with the same layout, or align='end' to count positions from the last token",
                              argument="align")
    k = min(n, m)
    return {"maps": a["maps"][..., -k:, -k:] + b["maps"][..., -k:, -k:],
            "patterns": a["patterns"][..., -k:, -k:] + b["patterns"][..., -k:, -k:],
            "metric": a["metric"] + b["metric"]}


def _mean(sums: Sums, count: int, first: dict, align: str) -> ReversedAttention:
    """The averaged result; the first example's tokens (its last n, under "end") for display."""
    n = sums["maps"].shape[-1]
    dtype = getattr(torch, first["dtype"])
    start = first["length"] - n  # exact: 0 (all prompts share the length)
    return ReversedAttention(
        maps=(sums["maps"] / count).to(dtype), patterns=(sums["patterns"] / count).to(dtype),
        layers=tuple(first["layers"]), scales=tuple(first["scales"]),
        tokens=first["tokens"][start:start + n][None].clone(), mask=torch.ones(1, n, dtype=torch.bool),
        last=torch.tensor([n - 1]), str_tokens=[list(first["str_tokens"][start:start + n])],
        metric=(sums["metric"] / count).to(dtype), n_examples=count, align=align, n_layers=first["n_layers"],
    )
