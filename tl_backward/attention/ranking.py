"""Head ranking by Reversed Attention norm, streamed over a dataset (Katz & Wolf, NAACL 2025; docs/reversed_attention.md).

score(l, h) = mean over examples of ‖RA_{l,h}‖_F (the whole T×T map, sign ignored); the baseline
is ‖P_{l,h}‖_F of the forward pattern. Standard deviations are kept too. Cost: one forward and one
backward per batch of prompts, versus one forward per head for causal mediation. Only the norms are
accumulated, and they are taken layer by layer inside the backward (``reversed_attention(...,
keep="norms")``): no batch's maps are ever held for all layers.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.sweep import dataset_size, run_sweep
from tl_backward.errors import TLBackwardError

from .render import head_ranking_page
from .reversed import reversed_attention
from .targets import describe, example_batches

__all__ = ["HeadRanking", "rank_heads"]

WHICH = ("reversed", "forward", "random")


@dataclass(frozen=True, repr=False)
class HeadRanking:
    """Per-head norm statistics over ``n_examples`` prompts: ``[layer, head]`` tensors (layer axis =
    :attr:`layers`). ``reversed_*`` are ‖RA‖_F, ``forward_*`` are ‖P‖_F; std is the sample std
    (0 for one example)."""

    reversed_mean: Float[Tensor, "layer head"]
    reversed_std: Float[Tensor, "layer head"]
    forward_mean: Float[Tensor, "layer head"]
    forward_std: Float[Tensor, "layer head"]
    layers: tuple[int, ...]
    n_examples: int

    def __repr__(self) -> str:
        top = ", ".join(f"L{l}H{h}" for l, h, _ in self.top(3))
        return (f"HeadRanking({self.n_examples} examples, {len(self.layers)} layers x "
                f"{self.reversed_mean.shape[1]} heads; top RA heads {top})")

    def scores(self, which: str = "reversed") -> Float[Tensor, "layer head"]:
        if which == "reversed":
            return self.reversed_mean
        if which == "forward":
            return self.forward_mean
        raise TLBackwardError(f"which must be 'reversed' (‖RA‖_F) or 'forward' (‖P‖_F), got {which!r:.40}",
                              argument="which")

    def order(self, which: str = "reversed", *, seed: int = 0, descending: bool = True) -> list[tuple[int, int]]:
        """All ``(layer, head)`` pairs ranked by ``which``: "reversed" (‖RA‖_F), "forward" (‖P‖_F),
        or "random" (a seeded shuffle, the paper's control). ``descending=False`` reverses it."""
        checks.flag(descending, "descending")
        checks.one_of(which, "which", WHICH)
        H = self.reversed_mean.shape[1]
        heads = [(l, h) for l in self.layers for h in range(H)]
        if which == "random":
            random.Random(seed).shuffle(heads)
            ranked = heads
        else:
            flat = self.scores(which).flatten()
            # Stable sort on -score: ties keep (layer, head) order.
            idx = sorted(range(len(flat)), key=lambda i: -float(flat[i]))
            ranked = [heads[i] for i in idx]
        return ranked if descending else ranked[::-1]

    def top(self, k: int = 10, which: str = "reversed") -> list[tuple[int, int, float]]:
        """The ``k`` best heads as ``(layer, head, mean norm)``."""
        k = checks.count(k, "k", minimum=1)
        scores = self.scores(which)
        out = []
        for l, h in self.order(which)[:k]:
            out.append((l, h, float(scores[self.layers.index(l), h])))
        return out

    def table(self, which: str = "reversed") -> str:
        """A plain-text layer × head table of the mean norms (layers as columns, like the paper)."""
        s = self.scores(which)
        head = "head " + " ".join(f"{'L' + str(l):>9}" for l in self.layers)
        rows = [f"{h:>4} " + " ".join(f"{float(s[i, h]):9.3g}" for i in range(len(self.layers)))
                for h in range(s.shape[1])]
        return "\n".join([head, *rows])

    def render(self, *, title: str | None = None):
        """Page of layer × head heatmaps: mean and std of ‖RA‖_F (purples) and ‖P‖_F (greens)."""
        return head_ranking_page(self, title=title)


def rank_heads(
    model: Any,
    prompts: Sequence[str] | Tensor | Iterable[Any],
    targets: Any = None,
    *,
    metric: Any = None,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> HeadRanking:
    """Rank heads by mean ‖RA‖_F over a dataset, one forward + backward per batch.

    ``prompts``: a list of strings or token ids ``[n, pos]``, or any iterable of examples (a
    generator, a ``datasets.Dataset``): strings, ``(prompt, target)`` pairs or ``{"prompt",
    "target"}`` mappings, batched ``batch_size`` at a time and never held in memory all at once.
    ``targets``: one per prompt (strings or token ids) or one for all; or pass ``metric``.
    Only per-example norms are accumulated (float64 sums and sums of squares), never maps.
    Under ``torchrun`` the batches are sharded over the ranks and every rank returns the same
    ranking; ``checkpoint=path`` makes the run resumable (core/sweep.py). A tqdm bar shows progress
    (``progress=False`` hides it).
    """
    checks.flag(progress, "progress")
    ad = get_adapter(model)
    layer_ids = tuple(ad.layers(layers))

    def step(batch: tuple[Any, Any, Any]) -> tuple[dict[str, Tensor], int]:
        chunk, tgt, met = batch
        ra = reversed_attention(model, chunk, tgt, metric=met, layers=layer_ids, prepend_bos=prepend_bos,
                                keep="norms")  # reduced per layer inside the backward: no maps
        r = ra.reversed_norms.double()  # [layer, batch, head]
        f = ra.forward_norms.double()
        return {"ra": r.sum(1), "ra_sq": (r * r).sum(1), "p": f.sum(1), "p_sq": (f * f).sum(1)}, r.shape[1]

    fingerprint = (f"rank_heads {getattr(model.cfg, 'model_name', '?')} layers={list(layer_ids)} "
                   f"batch_size={batch_size} prepend_bos={prepend_bos} targets={describe(targets)} "
                   f"metric={describe(metric)}")
    swept = run_sweep(example_batches(prompts, targets, metric, batch_size, "targets"), step,
                           fingerprint=fingerprint, checkpoint=checkpoint, progress=progress, desc="rank_heads",
                           total=dataset_size(prompts))
    sums, done = swept.sums, swept.count
    mean_r, mean_f = sums["ra"] / done, sums["p"] / done

    def std(sq: Tensor, mean: Tensor) -> Tensor:
        if done < 2:
            return torch.zeros_like(mean)
        return ((sq - done * mean * mean) / (done - 1)).clamp_min(0).sqrt()

    return HeadRanking(
        reversed_mean=mean_r.float(), reversed_std=std(sums["ra_sq"], mean_r).float(),
        forward_mean=mean_f.float(), forward_std=std(sums["p_sq"], mean_f).float(),
        layers=layer_ids, n_examples=done,
    )
