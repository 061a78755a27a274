"""Scalar metrics whose gradient tl_backward reads.

A metric is either one of the objects here or any callable ``(logits, tokens) -> scalar tensor``.
The objects here *bind* to a batch first, because a multi-token target changes the input:
the target is appended (teacher forcing) and its tokens are scored one position each.

Conventions: batches reduce by **sum** (a batch of B equals the sum of B single runs), and the
loss position of a row is its last real prompt position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .adapter import Batch, ModelAdapter

LogitsFn = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]


@dataclass(frozen=True)
class TargetNLL:
    """Negative log-likelihood of a target continuation, summed over the batch.

    One target token t: ``L = Σ_b −log softmax(logits[b, last_b])[t]``.
    A target of T tokens: the input becomes ``prompt + target[:-1]`` and
    ``L = Σ_b Σ_k −log p(target_k | prompt, target_<k)`` (teacher forcing).
    ``target`` is a string (tokenised without BOS; mind the leading space for BPE models),
    token ids, or a list with one target per prompt.
    """

    target: Any

    def bind(self, adapter: ModelAdapter, batch: Batch) -> tuple[Batch, LogitsFn]:
        targets = _per_row(self.target, len(batch.tokens), adapter)
        rows, b_idx, p_idx, labels = [], [], [], []
        for b, (prompt, tgt) in enumerate(zip(batch.rows(), targets)):
            rows.append(torch.cat([prompt, tgt[:-1]]))
            first = len(prompt) - 1
            b_idx += [b] * len(tgt)
            p_idx += list(range(first, first + len(tgt)))
            labels += tgt.tolist()
        bound = adapter._check_length(Batch.from_rows(rows, adapter.pad_id))
        bound = Batch(tokens=bound.tokens, mask=bound.mask, last=batch.last)
        b_idx, p_idx, labels = (torch.tensor(v) for v in (b_idx, p_idx, labels))

        def nll(logits: Tensor) -> Tensor:
            picked = logits[b_idx.to(logits.device), p_idx.to(logits.device)].float()
            logp = torch.log_softmax(picked, dim=-1)
            return -logp.gather(-1, labels.to(logits.device)[:, None]).sum()

        return bound, nll


@dataclass(frozen=True)
class LogitDiff:
    """``Σ_b (logits[b, last_b, a] − logits[b, last_b, b])`` for single tokens ``a`` and ``b``."""

    a: Any
    b: Any

    def bind(self, adapter: ModelAdapter, batch: Batch) -> tuple[Batch, LogitsFn]:
        ids = []
        for name, value in (("a", self.a), ("b", self.b)):
            tok = adapter.target_tokens(value)
            if tok.numel() != 1:
                raise ValueError(f"logit_diff: {name}={value!r} is {tok.numel()} tokens; pass a single token")
            ids.append(int(tok[0]))
        last = batch.last

        def diff(logits: Tensor) -> Tensor:
            rows = logits[torch.arange(len(last), device=logits.device), last.to(logits.device)].float()
            return (rows[:, ids[0]] - rows[:, ids[1]]).sum()

        return batch, diff


def target_nll(target: Any) -> TargetNLL:
    """The target's negative log-likelihood (see :class:`TargetNLL`)."""
    if target is None:
        raise ValueError("target is None: pass a target string or token id")
    return TargetNLL(target)


def logit_diff(a: Any, b: Any) -> LogitDiff:
    """Logit of ``a`` minus logit of ``b`` at each row's last position, summed over rows."""
    return LogitDiff(a, b)


def bind_metric(metric: Any, adapter: ModelAdapter, batch: Batch) -> tuple[Batch, LogitsFn]:
    """Resolve ``metric`` into the batch to run and a function ``logits -> scalar``."""
    if hasattr(metric, "bind"):
        return metric.bind(adapter, batch)
    if isinstance(metric, (str, int)) or not callable(metric):
        raise TypeError(
            f"metric must be tl_backward.metrics.target_nll(...)/logit_diff(...) or a callable "
            f"(logits, tokens) -> scalar, got {type(metric).__name__}; for a target word use target_nll({metric!r})"
        )
    tokens = batch.tokens
    return batch, lambda logits: metric(logits, tokens.to(logits.device))


def resolve_metric(target: Any, metric: Any) -> Any:
    """The metric of an analysis called with ``target=`` or ``metric=`` (exactly one)."""
    if (target is None) == (metric is None):
        raise ValueError("pass exactly one of target= (a word or token id) and metric= (a callable)")
    return target_nll(target) if metric is None else metric


def check_scalar(value: Any) -> Tensor:
    """Validate a metric's output: a scalar tensor on the autograd graph."""
    if not isinstance(value, Tensor):
        raise TypeError(f"the metric must return a torch scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"the metric must return a scalar, got shape {tuple(value.shape)}: reduce it (e.g. .sum()) "
            "so that the batch is summed"
        )
    if not value.requires_grad:
        raise ValueError(
            "the metric's value has no autograd graph (was it detached, computed under torch.no_grad(), "
            "or not derived from the logits?)"
        )
    return value.reshape(())


def _per_row(target: Any, n_rows: int, adapter: ModelAdapter) -> list[Int[Tensor, " t"]]:
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
        if len(target) != n_rows:
            raise ValueError(f"got {len(target)} targets for {n_rows} prompts: pass one target per prompt or a single target")
        return [adapter.target_tokens(t) for t in target]
    ids = adapter.target_tokens(target)
    return [ids] * n_rows


__all__: Sequence[str] = ["TargetNLL", "LogitDiff", "target_nll", "logit_diff", "bind_metric", "resolve_metric", "check_scalar"]
