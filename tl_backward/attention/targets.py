"""Targets for dataset-level analyses: one target for all prompts, or one per prompt, batched.

As in core's ``target_nll``, a list/tuple holds one target per prompt (strings or token ids; ids
matter because decoding them back to strings is not lossless for BPE). :class:`RowTargetNLL`
spells out the single-token, one-id-per-row case on its own (tests check that it agrees with
``target_nll`` of per-row ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.sweep import batched
from tl_backward.errors import TLBackwardError

__all__ = ["RowTargetNLL", "batch_target", "check_prompts", "describe", "example_batches"]


@dataclass(frozen=True)
class RowTargetNLL:
    """``Σ_b −log p(ids[b])`` at each row's last prompt position (one single-token target per row).

    Equal to ``target_nll([...strings...])`` when each string is one token; would fold into core
    if ``tl_backward.core.metrics.target_nll`` accepted one id per row.
    """

    ids: tuple[int, ...]

    def bind(self, adapter: Any, batch: Any):
        if len(self.ids) != len(batch.tokens):
            raise TLBackwardError(f"got {len(self.ids)} targets for {len(batch.tokens)} prompts: pass one target "
                                  "per prompt", argument="target")
        for t in self.ids:
            checks.count(t, "target", maximum=adapter.d_vocab - 1, hint="a token id of the vocabulary")
        ids = torch.tensor(self.ids)
        last = batch.last

        def nll(logits: Tensor) -> Tensor:
            rows = torch.arange(len(last), device=logits.device)
            picked = logits[rows, last.to(logits.device)].float()
            return -torch.log_softmax(picked, -1)[rows, ids.to(logits.device)].sum()

        return batch, nll


def check_prompts(prompts: Any, batch_size: int) -> int:
    """Validate a dataset of prompts (list of strings or ids ``[n, pos]``); return its size."""
    checks.count(batch_size, "batch_size", minimum=1)
    if isinstance(prompts, str):
        raise TLBackwardError("prompts must be a list of strings (or token ids [n, pos]), not one string",
                              argument="prompts")
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise TLBackwardError(f"token-id prompts must have shape [n, pos], got {tuple(prompts.shape)}",
                                  argument="prompts")
        return len(checks.token_tensor(prompts, "prompts"))
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TLBackwardError("prompts must be a non-empty list of strings", argument="prompts")
    if not all(isinstance(p, str) for p in prompts):
        raise TLBackwardError("prompts must all be strings (or pass token ids as a LongTensor [n, pos])",
                              argument="prompts")
    return len(prompts)


def batch_target(target: Any, metric: Any, n: int, i: int, j: int, argument: str = "target") -> tuple[Any, Any]:
    """``(target, metric)`` for prompts ``i:j`` of ``n``: exactly one is not None.

    A list/tuple holds one target per prompt (strings, token ids, or both), as in core's
    ``target_nll``, and must have ``n`` entries; anything else is one target for every prompt.
    ``argument`` is the caller's name for ``target`` (``targets`` in :func:`~tl_backward.rank_heads`)."""
    if (target is None) == (metric is None):
        raise TLBackwardError(f"pass exactly one of {argument}= (a word, a token id, or one per prompt) and "
                              "metric=", argument=argument if metric is None else "metric")
    if metric is not None:
        return None, metric
    if isinstance(target, (list, tuple)):
        if len(target) != n:
            raise TLBackwardError(f"got {len(target)} {argument} for {n} prompts: a list holds one target per "
                                  "prompt; pass one per prompt, or a single target for all", argument=argument)
        return list(target[i:j]), None
    return target, None


def example_batches(prompts: Any, target: Any, metric: Any, batch_size: int,
                    argument: str = "target") -> Iterator[tuple[Any, Any, Any]]:
    """``(prompts, target, metric)`` per batch of a dataset, drawn lazily (for the sweeps).

    ``prompts`` is a list of strings or token ids ``[n, pos]`` (with ``target`` one for all or one per
    prompt, as :func:`batch_target`), or any iterable of examples -- a generator, a
    ``datasets.Dataset`` -- each a string (``target`` one for all, or ``metric``), a ``(prompt,
    target)`` pair or a mapping with ``"prompt"`` and ``"target"`` keys.
    """
    checks.count(batch_size, "batch_size", minimum=1)
    if isinstance(prompts, Tensor) or (isinstance(prompts, (list, tuple)) and all(isinstance(p, str)
                                                                                 for p in prompts)):
        n = check_prompts(prompts, batch_size)
        for i in range(0, n, batch_size):
            yield (prompts[i:i + batch_size], *batch_target(target, metric, n, i, i + batch_size, argument))
        return
    if isinstance(prompts, str) or not isinstance(prompts, Iterable):
        check_prompts(prompts, batch_size)  # raises the list-of-strings error
    seen = 0
    for chunk in batched(prompts, batch_size):
        texts, targets = zip(*(_example(e, seen + j, target, metric, argument) for j, e in enumerate(chunk)))
        seen += len(chunk)
        per_row = targets[0] is not _SHARED
        yield list(texts), (list(targets) if per_row else (None if metric is not None else target)), metric
    if not seen:
        raise TLBackwardError("prompts is empty: pass at least one example", argument="prompts")


_SHARED = object()  # marks an example without its own target


def _example(e: Any, i: int, target: Any, metric: Any, argument: str) -> tuple[str, Any]:
    """One example as ``(prompt, its target or _SHARED)``; clear errors name the example's index."""
    if isinstance(e, str):
        if isinstance(target, (list, tuple)) or (target is None) == (metric is None):
            raise TLBackwardError(f"prompts: example {i} is a bare string: with a streamed dataset pass one {argument} for "
                                  "all (or metric=), or make each example a (prompt, target) pair",
                                  argument=argument)
        return e, _SHARED
    if isinstance(e, dict) and {"prompt", "target"} <= set(e):
        prompt, own = e["prompt"], e["target"]
    elif isinstance(e, (tuple, list)) and len(e) == 2:
        prompt, own = e
    else:
        raise TLBackwardError(f"prompts: example {i} must be a string, a (prompt, target) pair or a mapping with 'prompt' "
                              f"and 'target', got {type(e).__name__}", argument="prompts")
    if not isinstance(prompt, str):
        raise TLBackwardError(f"prompts: example {i}: the prompt must be a string, got {type(prompt).__name__}",
                              argument="prompts")
    if target is not None or metric is not None:
        raise TLBackwardError(f"prompts: example {i} carries its own target: leave {argument}= and metric= unset",
                              argument=argument)
    return prompt, own


def describe(value: Any) -> str:
    """A short stable description of a target/metric argument for a checkpoint's fingerprint."""
    if value is None or isinstance(value, (str, int)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return f"{len(value)} per-prompt targets, first {value[0]!r:.30}" if value else "[]"
    return getattr(value, "__qualname__", type(value).__name__)
