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
from tl_backward.core.device import stack_on
from tl_backward.core.sweep import Sums, dataset_size, run_sweep

from .reduced import aligned, check_one_length, cropped
from .reversed import MeanAccumulator, ReversedAttention, check_align, ra_pass
from .targets import describe, example_batches

__all__ = ["MeanAccumulator", "mean_over", "aligned"]


class LayerSums:
    """Batch sums of each layer's RA map and pattern, taken inside the backward pass (the reducer
    :func:`mean_over` hands to :func:`~tl_backward.attention.reversed.ra_pass`): a batch's maps are
    never held for all layers at once, only the float64 sums ``[layer, 1, head, n, n]``. ``align``:
    "exact" (one token length per batch, refused otherwise) or "end" (each row's last n real
    positions, n = the batch's shortest prompt)."""

    def __init__(self, align: str):
        self.align = align
        self.maps: dict[int, Tensor] = {}
        self.patterns: dict[int, Tensor] = {}

    def start(self, batch: Any) -> None:
        self.lengths = batch.mask.sum(1)
        self.n = check_one_length(self.lengths.tolist()) if self.align == "exact" else int(self.lengths.min())

    def _sum(self, x: Tensor) -> Tensor:
        return cropped(x, self.align, self.lengths, self.n).double().sum(0, keepdim=True)

    def add(self, i: int, ra: Tensor, pattern: Tensor) -> None:
        self.maps[i], self.patterns[i] = self._sum(ra), self._sum(pattern.float())

    def result(self, out: Any) -> Sums:
        """``{"maps", "patterns", "metric"}`` sums on ``out.device``; layers the metric never reached
        (not in :meth:`add`) have RA 0 and their forward patterns from ``out.patterns``."""
        for i, p in out.patterns.items():
            self.add(i, torch.zeros_like(p, dtype=torch.float32), p)
        n_layers = len(out.fields["layers"])
        return {"maps": stack_on([self.maps[i] for i in range(n_layers)], out.device),
                "patterns": stack_on([self.patterns[i] for i in range(n_layers)], out.device),
                "metric": out.fields["metric"].detach().double().cpu()}


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
        sums = LayerSums(align)
        out = ra_pass(model, chunk, tgt, metric=met, layers=layer_ids, prepend_bos=prepend_bos, reduce=sums)
        f = out.fields
        first = [] if k else [{"tokens": f["tokens"][0].clone(), "str_tokens": list(f["str_tokens"][0]),
                               "length": int(f["mask"][0].sum()), "layers": list(f["layers"]),
                               "scales": list(f["scales"]), "n_layers": f["n_layers"], "dtype": "float32"}]
        return sums.result(out), len(f["tokens"]), first

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
    if align == "exact":
        check_one_length([n, m])
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
