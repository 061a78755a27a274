"""Scalar metrics whose gradient tl_backward reads.

A metric is either one of the objects here or any callable ``(logits, tokens) -> scalar tensor``.
The objects here *bind* to a batch first, because a multi-token target changes the input:
the target is appended (teacher forcing) and its tokens are scored one position each.

Conventions: batches reduce by **sum** (a batch of B equals the sum of B single runs), and the
loss position of a row is its last real prompt position. A target is one target for every row
(a string, an int id, or a 1-D tensor of ids for a multi-token target) or a **list/tuple with one
target per row** -- a list of ints means one id per row exactly as a list of strings means one
word per row, whatever the batch size, so its meaning never depends on its length. A metric's
value must be finite: NaN or ±inf has no useful gradient and is refused naming the metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_backward.errors import TLBackwardError

from .adapter import ModelAdapter
from .batch import Batch

LogitsFn = Callable[[Float[Tensor, "batch pos vocab"]], Tensor]


@dataclass(frozen=True, repr=False)
class Picked:
    """A bound metric that reads the logits at ``(rows[i], positions[i])`` only.

    ``self(logits)`` scores full logits ``[batch, pos, vocab]``; ``of_picked(picked)`` scores the
    ``[n, vocab]`` rows ``logits[rows, positions]`` directly. Knowing the positions lets the pass
    (core/stream.py) unembed only them: at GPT-2-small's shape, 64 tokens, the ``[pos, d_model] @
    [d_model, vocab]`` readout and its backward are about a third of a forward+backward, and all
    but ``n`` of its rows are discarded by the metric anyway.
    """

    rows: Int[Tensor, " n"]
    positions: Int[Tensor, " n"]
    of_picked: Callable[[Float[Tensor, "n vocab"]], Tensor]

    def __repr__(self) -> str:
        return f"Picked({len(self.rows)} positions)"

    def __call__(self, logits: Float[Tensor, "batch pos vocab"]) -> Tensor:
        d = logits.device
        return self.of_picked(logits[self.rows.to(d), self.positions.to(d)])


@dataclass(frozen=True)
class TargetNLL:
    """Negative log-likelihood of a target continuation, summed over the batch.

    One target token t: ``L = Σ_b −log softmax(logits[b, last_b])[t]``.
    A target of T tokens: the input becomes ``prompt + target[:-1]`` and
    ``L = Σ_b Σ_k −log p(target_k | prompt, target_<k)`` (teacher forcing).
    ``target`` is one target for every prompt -- a string (tokenised without BOS; mind the
    leading space for BPE models), an int id, or a 1-D tensor of ids (multi-token) -- or a
    list/tuple with one target per prompt (strings, ids, or id tensors; ``[5, 6]`` means id 5 for
    row 0 and id 6 for row 1, so it needs a batch of two).
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
        bound = adapter._check_length(Batch.from_rows(rows, adapter.pad_id), "target",
                                      "the input plus the target (teacher-forced)")
        bound = Batch(tokens=bound.tokens, mask=bound.mask, last=batch.last)
        b_idx, p_idx, labels = (torch.tensor(v) for v in (b_idx, p_idx, labels))

        def nll(picked: Tensor) -> Tensor:
            logp = torch.log_softmax(picked.float(), dim=-1)
            return -logp.gather(-1, labels.to(picked.device)[:, None]).sum()

        return bound, Picked(b_idx, p_idx, nll)


@dataclass(frozen=True)
class LogitDiff:
    """``Σ_b (logits[b, last_b, a] − logits[b, last_b, b])`` for single tokens ``a`` and ``b``."""

    a: Any
    b: Any

    def bind(self, adapter: ModelAdapter, batch: Batch) -> tuple[Batch, LogitsFn]:
        ids = []
        for name, value in (("a", self.a), ("b", self.b)):
            if value is None:
                raise TLBackwardError(f"logit_diff: {name} is None: pass a single-token word or a token id",
                                      argument=name)
            tok = adapter.target_tokens(value, name)
            if tok.numel() != 1:
                raise TLBackwardError(f"logit_diff: {name}={value!r} is {tok.numel()} tokens; pass a single token",
                                      argument=name)
            ids.append(int(tok[0]))
        last = batch.last

        def diff(picked: Tensor) -> Tensor:
            rows = picked.float()
            return (rows[:, ids[0]] - rows[:, ids[1]]).sum()

        return batch, Picked(torch.arange(len(last)), last, diff)


def target_nll(target: Any) -> TargetNLL:
    """The target's negative log-likelihood (see :class:`TargetNLL`)."""
    if target is None:
        raise TLBackwardError("target is None: pass a target string or token id", argument="target")
    return TargetNLL(target)


def logit_diff(a: Any, b: Any) -> LogitDiff:
    """Logit of ``a`` minus logit of ``b`` at each row's last position, summed over rows."""
    return LogitDiff(a, b)


def bind_metric(metric: Any, adapter: ModelAdapter, batch: Batch) -> tuple[Batch, LogitsFn]:
    """Resolve ``metric`` into the batch to run and a function ``logits -> scalar``."""
    if hasattr(metric, "bind"):
        return metric.bind(adapter, batch)
    if isinstance(metric, (str, int)) or not callable(metric):
        raise TLBackwardError(
            f"metric must be tl_backward.metrics.target_nll(...)/logit_diff(...) or a callable "
            f"(logits, tokens) -> scalar, got {type(metric).__name__}; for a target word use target_nll({metric!r})",
            argument="metric")
    tokens = batch.tokens
    return batch, lambda logits: metric(logits, tokens.to(logits.device))


def resolve_metric(target: Any, metric: Any) -> Any:
    """The metric of an analysis called with ``target=`` or ``metric=`` (exactly one)."""
    if (target is None) == (metric is None):
        which = "metric" if metric is not None else "target"
        raise TLBackwardError("pass exactly one of target= (a word or token id) and metric= (a callable)",
                              argument=which)
    return target_nll(target) if metric is None else metric


def describe(metric: Any) -> str:
    """A short name of a metric for messages: ``target_nll(' Paris')``, a function's name, ..."""
    if isinstance(metric, TargetNLL):
        return f"target_nll({metric.target!r:.40})"
    if isinstance(metric, LogitDiff):
        return f"logit_diff({metric.a!r:.20}, {metric.b!r:.20})"
    name = getattr(metric, "__qualname__", None) or type(metric).__name__
    return f"{name}"


def check_scalar(value: Any, metric: Any = None) -> Tensor:
    """Validate a metric's output: a finite scalar tensor on the autograd graph. ``metric``
    (the metric object) names it in the message."""
    which = f"the metric {describe(metric)}" if metric is not None else "the metric"
    if not isinstance(value, Tensor):
        raise TLBackwardError(f"{which} must return a torch scalar tensor, got {type(value).__name__}",
                              argument="metric")
    if value.numel() != 1:
        raise TLBackwardError(
            f"{which} must return a scalar, got shape {tuple(value.shape)}: reduce it (e.g. .sum()) "
            "so that the batch is summed", argument="metric")
    if not value.requires_grad:
        raise TLBackwardError(
            f"{which} returned a value with no autograd graph (was it detached, computed under "
            "torch.no_grad(), or not derived from the logits?)", argument="metric")
    if not bool(torch.isfinite(value.detach()).all()):
        raise TLBackwardError(
            f"{which} returned {float(value.detach().reshape(()))}: a NaN or infinite metric has no usable "
            "gradient; check the metric (e.g. log of 0, division by 0)", argument="metric")
    return value.reshape(())


def _per_row(target: Any, n_rows: int, adapter: ModelAdapter) -> list[Int[Tensor, " t"]]:
    """One id tensor per row: a list/tuple holds one target per row, anything else is shared."""
    if isinstance(target, (list, tuple)):
        if len(target) != n_rows:
            raise TLBackwardError(
                f"got {len(target)} targets for {n_rows} prompts: a list holds one target per prompt (strings "
                "or token ids); pass one target per prompt, or a single target (a string, an int, or "
                "torch.tensor(ids) for a multi-token target) for every prompt", argument="target")
        return [adapter.target_tokens(t) for t in target]
    ids = adapter.target_tokens(target)
    return [ids] * n_rows


__all__: Sequence[str] = ["Picked", "TargetNLL", "LogitDiff", "target_nll", "logit_diff", "bind_metric", "resolve_metric",
                          "check_scalar", "describe"]
