"""Targets for dataset-level analyses: one target for all prompts, or one per prompt, batched.

``target_nll`` (core) takes one target or a list of *strings* per row; a list of ints is read as
*one* multi-token target for every row. Datasets often hold one token id per prompt, and decoding
ids back to strings is not lossless for BPE, so :class:`RowTargetNLL` scores one id per row. It is
the single-token case of core's ``TargetNLL`` with per-row ids (tests check the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["RowTargetNLL", "batch_target", "check_prompts"]


@dataclass(frozen=True)
class RowTargetNLL:
    """``Σ_b −log p(ids[b])`` at each row's last prompt position (one single-token target per row).

    Equal to ``target_nll([...strings...])`` when each string is one token; would fold into core
    if ``tl_backward.core.metrics.target_nll`` accepted one id per row.
    """

    ids: tuple[int, ...]

    def bind(self, adapter: Any, batch: Any):
        if len(self.ids) != len(batch.tokens):
            raise ValueError(f"got {len(self.ids)} targets for {len(batch.tokens)} prompts")
        for t in self.ids:
            if not 0 <= t < adapter.d_vocab:
                raise ValueError(f"target id {t} is outside the vocabulary [0, {adapter.d_vocab})")
        ids = torch.tensor(self.ids)
        last = batch.last

        def nll(logits: Tensor) -> Tensor:
            rows = torch.arange(len(last), device=logits.device)
            picked = logits[rows, last.to(logits.device)].float()
            return -torch.log_softmax(picked, -1)[rows, ids.to(logits.device)].sum()

        return batch, nll


def check_prompts(prompts: Any, batch_size: int) -> int:
    """Validate a dataset of prompts (list of strings or ids ``[n, pos]``); return its size."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings (or token ids [n, pos]), not one string")
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise ValueError(f"token-id prompts must have shape [n, pos], got {tuple(prompts.shape)}")
        return len(prompts)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must all be strings (or pass token ids as a LongTensor [n, pos])")
    return len(prompts)


def _is_per_prompt(target: Any, n: int) -> bool:
    return isinstance(target, (list, tuple)) and len(target) == n and n > 0 and all(
        isinstance(t, (str, int)) and not isinstance(t, bool) for t in target)


def batch_target(target: Any, metric: Any, n: int, i: int, j: int) -> tuple[Any, Any]:
    """``(target, metric)`` for prompts ``i:j`` of ``n``: exactly one is not None.

    A list/tuple with one entry per prompt is read as per-prompt targets (strings, or token ids,
    one token each); anything else is one target for every prompt."""
    if (target is None) == (metric is None):
        raise ValueError("pass exactly one of target= (a word, a token id, or one per prompt) and metric=")
    if metric is not None:
        return None, metric
    if _is_per_prompt(target, n) and (n > 1 or isinstance(target[0], str)):
        chunk = list(target[i:j])
        if all(isinstance(t, str) for t in chunk):
            return chunk, None
        if all(isinstance(t, int) for t in chunk):
            return None, RowTargetNLL(tuple(chunk))
        raise TypeError("per-prompt targets must be all strings or all token ids")
    return target, None
