"""In-context-learning attention patching (Katz & Wolf, NAACL 2025, §5; docs/reversed_attention.md).

For each n_shots: average RA (and the forward patterns) over ``n_train`` k-shot training prompts,
then, on every test query, add ``η·RĀ`` (or the control ``η·P̄``) to every head's post-softmax
pattern and score top-1/2/3 accuracy of the answer's first token at the last prompt position.
Weights never change. Prompts use the paper's template: ``"Q: {x}\\nA: {y}\\n\\n"`` per
demonstration, then ``"Q: {x}\\nA:"``, target ``" {y}"``; demonstrations are drawn (seeded) from
the train pairs, never the query itself. BOS is prepended explicitly.

Maps are averaged and added cell by cell, so every prompt of one n_shots must have the same token
length (checked; :func:`constant_length_pairs` builds the paper's constant-length subsets for BPE
tokenizers). The reference runs prompt+target with the loss at the last prompt position; the
appended token's RA row and column are zero and it cannot affect earlier positions, so running the
prompt alone (as here) gives the same maps and predictions.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from tl_backward.core import checks
from tl_backward.core.device import input_device
from tl_backward.core.sweep import batched, checkpoint_part, dataset_size, run_sweep

from ..core.adapter import get_adapter
from ..core.results import FrozenDict, Record
from ..errors import TLBackwardError
from ..zoo.world import World
from .aggregate import mean_over
from .patching import patch_attention

__all__ = ["PAPER_ETAS", "PAPER_SHOTS", "icl_prompt", "icl_prompts", "answer_ids", "topk_hits", "evaluate",
           "constant_length_pairs", "world_pairs", "icl_patching", "ICLPatching", "ICLRow",
           "format_icl_table", "to_frame"]

# The paper's η grid, in its order (Katz & Wolf 2025, ICL experiments); negative η is the descent direction.
PAPER_ETAS = (3, 2, 1, 0.5, 0, -0.1, 0.25, -0.5, -1, -2, -4, -6, -8, -10, -15, -20, -25, -30, -35,
              -40, -60, -80, -100, -120)
PAPER_SHOTS = (0, 1, 5, 10)
KS = (1, 2, 3)

Pair = tuple[str, str]


def icl_prompt(demos: Sequence[Pair], query: str) -> str:
    """``"Q: x\\nA: y\\n\\n"`` per demonstration, then ``"Q: query\\nA:"``."""
    return "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demos) + f"Q: {query}\nA:"


def icl_prompts(train: Sequence[Pair], queries: Sequence[Pair], n_shots: int, *,
                seed: int = 0) -> list[tuple[str, str]]:
    """``(prompt, target)`` per query pair, with ``n_shots`` demonstrations drawn from ``train``
    (seeded; excluding pairs whose input is the query's). ``target`` is ``" " + y``."""
    if not isinstance(n_shots, int) or n_shots < 0:
        raise TLBackwardError(f"n_shots must be a non-negative int, got {n_shots!r}", argument="n_shots")
    rng = random.Random(f"icl-{n_shots}-{seed}")
    out = []
    for x, y in queries:
        pool = [p for p in train if p[0] != x]
        if len(pool) < n_shots:
            raise TLBackwardError(f"only {len(pool)} training pairs to draw {n_shots} demonstrations from",
                                  argument="n_shots")
        out.append((icl_prompt(rng.sample(pool, n_shots), x), " " + y))
    return out


def answer_ids(model: Any, targets: Sequence[str]) -> list[int]:
    """First token id of each target (the token the accuracy is scored on)."""
    ad = get_adapter(model)
    return [int(ad.target_tokens(t)[0]) for t in targets]


def topk_hits(model: Any, prompts: Iterable[str], answers: Iterable[int], *, ks: Sequence[int] = KS,
              batch_size: int = 32, prepend_bos: bool | None = True, progress: bool = False,
              checkpoint: str | os.PathLike | None = None) -> torch.Tensor:
    """``Bool[n, len(ks)]``: whether each answer id is among the model's top-k at the prompt's last
    token (prompts right-padded per batch; call inside a patch/ablation context to score it)."""
    return evaluate(model, prompts, answers, ks=ks, batch_size=batch_size, prepend_bos=prepend_bos,
                    progress=progress, checkpoint=checkpoint)[0]


def evaluate(model: Any, prompts: Iterable[str], answers: Iterable[int], *, ks: Sequence[int] = KS,
             batch_size: int = 32, prepend_bos: bool | None = True, progress: bool = False,
             checkpoint: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits Bool[n, len(ks)], nll Float[n])``: top-k hits as :func:`topk_hits` and the answer's
    negative log-probability at the last prompt token.

    ``prompts`` and ``answers`` are any iterables (lists, generators), zipped and drawn
    ``batch_size`` at a time on the dataset sweep (core/sweep.py): per-example hits and NLL are
    records, so under ``torchrun`` the batches are sharded and every rank returns all of them in
    order; ``checkpoint=path`` makes the run resumable (the path names the condition scored: a
    patched and an unpatched run need different paths).
    """
    ad = get_adapter(model)
    device = input_device(model)
    ks = tuple(checks.count(k, "ks", minimum=1) for k in ks)

    @torch.no_grad()
    def step(chunk: list[tuple[str, int]]) -> tuple[dict, int, list]:
        batch = ad.tokenize([p for p, _ in chunk], prepend_bos)
        logits = model(batch.tokens.to(device), return_type="logits")
        rows = torch.arange(len(batch.last), device=logits.device)
        last = logits[rows, batch.last.to(logits.device)].float().cpu()
        top = last.topk(max(ks), dim=-1).indices
        ans = torch.tensor([int(a) for _, a in chunk])
        hits = torch.stack([(top[:, :k] == ans[:, None]).any(-1) for k in ks], dim=-1)
        nll = -torch.log_softmax(last, -1).gather(-1, ans[:, None])[:, 0]
        return {}, len(chunk), [(h, float(x)) for h, x in zip(hits.tolist(), nll)]

    fingerprint = (f"evaluate {getattr(model.cfg, 'model_name', '?')} ks={list(ks)} batch_size={batch_size} "
                   f"prepend_bos={prepend_bos}")
    swept = run_sweep(batched(_scored(prompts, answers), batch_size), step, fingerprint=fingerprint,
                      checkpoint=checkpoint, progress=progress, desc="evaluate", total=dataset_size(prompts))
    hits = torch.tensor([h for h, _ in swept.records], dtype=torch.bool).reshape(-1, len(ks))
    return hits, torch.tensor([x for _, x in swept.records], dtype=torch.float32)


def _scored(prompts: Iterable[str], answers: Iterable[int]) -> Iterable[tuple[str, int]]:
    """``(prompt, answer id)`` pairs drawn lazily; the two iterables must end together."""
    if isinstance(prompts, str):
        raise TLBackwardError("prompts must be a list (or iterable) of strings, not one string", argument="prompts")
    ans = iter(answers)
    for i, p in enumerate(prompts):
        a = next(ans, None)
        if a is None:
            raise TLBackwardError(f"answers ran out at prompt {i}: pass one answer id per prompt", argument="answers")
        yield p, a
    if next(ans, None) is not None:
        raise TLBackwardError("answers has more entries than prompts: pass one answer id per prompt",
                              argument="answers")


def _lengths(model: Any, prompts: Sequence[str], prepend_bos: bool | None) -> list[int]:
    ad = get_adapter(model)
    return [int(ad.tokenize(p, prepend_bos).tokens.shape[1]) for p in prompts]


def constant_length_pairs(model: Any, pairs: Sequence[Pair], *, prepend_bos: bool = True) -> list[Pair]:
    """The paper's constant-length subset: keep pairs whose answer ``" " + y`` is one token, group
    them by the token length of ``"Q: {x}\\nA: {y}"`` (with BOS) and return the largest group."""
    ad = get_adapter(model)
    groups: Counter = Counter()
    keyed = []
    for x, y in pairs:
        if len(ad.target_tokens(" " + y)) != 1:
            continue
        key = _lengths(model, [f"Q: {x}\nA: {y}"], prepend_bos)[0]
        keyed.append((key, (x, y)))
        groups[key] += 1
    if not groups:
        raise TLBackwardError("no pair has a single-token answer under this tokenizer")
    best = groups.most_common(1)[0][0]
    return [p for k, p in keyed if k == best]


def world_pairs(task: str = "antonym", *, world_seed: int = 0) -> tuple[list[Pair], list[Pair]]:
    """(train, test) pairs of an ICL task of the embedded models' synthetic world."""
    world = World(world_seed)
    return world.icl_pairs(task, "train"), world.icl_pairs(task, "test")


def topk_scores(hits: torch.Tensor, nll: torch.Tensor | None = None) -> dict[str, float]:
    out = {f"top{k}": 100.0 * float(hits[:, j].float().mean()) for j, k in enumerate(KS)}
    if nll is not None:
        out["nll"] = float(nll.mean())
    return out


@dataclass(frozen=True)
class ICLRow(Record):
    """One (n_shots, method, η) cell of :func:`icl_patching`, scored on ``n_test`` test queries of
    ``prompt_len`` tokens: top-1/2/3 accuracy (%) of the answer's first token at the last prompt
    position and ``nll``, the mean answer NLL in nats. ``method``: ``"none"`` (η = 0, unpatched),
    ``"reversed"`` (pattern ``P + η·RĀ``) or ``"forward"`` (the control ``P + η·P̄``)."""

    n_shots: int
    method: str
    eta: float
    top1: float
    top2: float
    top3: float
    nll: float
    n_test: int
    prompt_len: int

    def __repr__(self) -> str:
        return (f"ICLRow({self.n_shots}-shot, {self.method}, η {self.eta:g}: top-1/2/3 "
                f"{self.top1:.1f}/{self.top2:.1f}/{self.top3:.1f} %, NLL {self.nll:.3f})")


@dataclass(frozen=True)
class ICLPatching(Record):
    """Result of :func:`icl_patching`: one :class:`ICLRow` per (n_shots, method, η), in run order.

    ``fit_loss[n_shots]``: the mean training-prompt loss RĀ and P̄ come from (near 0 means near-zero
    RA, hence small effects at the paper's η); ``fit_source``: ``"train"`` (the first ``n_train``
    training queries) or ``"fit_queries"``; ``n_test``: test queries per row; ``model``: its name.
    """

    rows: tuple[ICLRow, ...]
    n_train: int
    n_test: int
    seed: int
    fit_loss: FrozenDict
    fit_source: str
    model: str

    def __repr__(self) -> str:
        shots = tuple(dict.fromkeys(r.n_shots for r in self.rows))
        etas = {r.eta for r in self.rows if r.method != "none"}
        return (f"ICLPatching({self.model}; shots {shots}, {len(etas)} η, {len(self.rows)} rows; maps over "
                f"{self.n_train} {'train' if self.fit_source == 'train' else 'fit'} prompts, "
                f"{self.n_test} test queries)")

    def row(self, n_shots: int, method: str, eta: float = 0.0) -> ICLRow:
        """The row of ``(n_shots, method, eta)`` (``method="none"`` is the η = 0 row)."""
        eta = 0.0 if method == "none" else float(eta)
        for r in self.rows:
            if (r.n_shots, r.method, r.eta) == (n_shots, method, eta):
                return r
        shots = sorted({r.n_shots for r in self.rows})
        etas = sorted({r.eta for r in self.rows if r.method != "none"})
        if n_shots not in shots:
            raise TLBackwardError(f"n_shots={n_shots!r} was not run; pass one of {shots}", argument="n_shots")
        if method not in ("none", "reversed", "forward"):
            raise TLBackwardError(f"method must be 'none', 'reversed' or 'forward', got {method!r}",
                                  argument="method")
        raise TLBackwardError(f"eta={eta!r} was not run; pass one of {etas}", argument="eta")

    def table(self) -> str:
        """Markdown table: one line per (n_shots, η); RA and control top-1/2/3 (NLL) side by side."""
        lines = [f"ICL attention patching -- model {self.model}, RĀ/P̄ over {self.n_train} "
                 f"{'train' if self.fit_source == 'train' else 'fit'} "
                 f"prompts, {self.n_test} test queries; top-1/2/3 accuracy (%) of the answer's first token",
                 "(and mean answer NLL in nats)", "",
                 "| shots | η | RA patch top-1/2/3 (NLL) | forward-map control top-1/2/3 (NLL) |", "|---|---|---|---|"]
        fmt = lambda r: f"{r.top1:.1f} / {r.top2:.1f} / {r.top3:.1f} ({r.nll:.3f})"  # noqa: E731
        for k in dict.fromkeys(r.n_shots for r in self.rows):
            none = self.row(k, "none")
            fit = self.fit_loss.get(k)
            extra = f" (train-prompt loss {fit:.3g})" if fit is not None else ""
            lines.append(f"| {k}{extra} | 0 (no patch) | {fmt(none)} | {fmt(none)} |")
            for eta in dict.fromkeys(r.eta for r in self.rows if r.n_shots == k and r.method != "none"):
                lines.append(f"| {k} | {eta:g} | {fmt(self.row(k, 'reversed', eta))} | "
                             f"{fmt(self.row(k, 'forward', eta))} |")
        return "\n".join(lines)

    def to_frame(self):
        """The rows as a pandas DataFrame, one column per :class:`ICLRow` field (pandas is
        optional: imported here only)."""
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.rows], columns=[*ICLRow.__dataclass_fields__])


def icl_patching(
    model: Any,
    train: Sequence[Pair],
    test: Sequence[Pair],
    *,
    n_shots: Sequence[int] = PAPER_SHOTS,
    etas: Sequence[float] = PAPER_ETAS,
    n_train: int = 25,
    fit_queries: Sequence[Pair] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    layers: Sequence[int] | None = None,
    prepend_bos: bool = True,
    progress: bool = False,
    verbose: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> ICLPatching:
    """Attention patching on ICL prompts: RA patching vs the forward-attention control vs no patch.

    ``train``/``test``: (x, y) pairs (e.g. :func:`world_pairs`). For each ``n_shots``: RĀ and P̄ are
    the means over training queries 0..``n_train``-1 (each loss the NLL of its answer's first
    token), and every η of ``etas`` is evaluated on all of ``test`` for ``P + η·RĀ`` ("reversed")
    and ``P + η·P̄`` ("forward"); η = 0 is the unpatched model ("none"). ``layers`` restricts the
    patch (None = every layer and head, as in the paper). ``fit_queries`` replaces the training
    queries the maps are averaged over (the first ``n_train`` of them; demonstrations still come from
    ``train``): needed when the model has memorised its training pairs, whose near-zero loss gives
    near-zero RA -- e.g. fit on one half of held-out pairs and evaluate on the other.

    Returns an :class:`ICLPatching`: one :class:`ICLRow` per (n_shots, method, η) with top-1/2/3
    (%) and ``nll``, the mean answer NLL in nats (it moves before the accuracies do), and
    ``fit_loss`` per n_shots, the mean training-prompt loss the maps come from (near 0 means
    near-zero RA, hence small effects at the paper's η). Prints its table when ``verbose``.

    Every mean and every evaluation is a dataset sweep (core/sweep.py): under ``torchrun`` the
    prompts are sharded over the ranks and every rank returns the same result; ``checkpoint=path``
    keeps one file per sub-sweep (``path.{k}shot.mean``, ``path.{k}shot.reversed.{η}``, ...), so a
    restarted run skips what is done.
    """
    if len(train) < 2 or not test:
        raise TLBackwardError("need at least 2 training pairs and 1 test pair", argument="test")
    queries = list(train if fit_queries is None else fit_queries)
    if not queries:
        raise TLBackwardError("fit_queries is empty: pass (x, y) pairs to average the maps over, or None",
                              argument="fit_queries")
    n_train = min(n_train, len(queries))
    etas = [float(e) for e in etas]
    rows, fit_loss = [], {}
    for k in n_shots:
        fit = icl_prompts(train, queries[:n_train], k, seed=seed)
        evals = icl_prompts(train, test, k, seed=seed + 1)
        lengths = set(_lengths(model, [p for p, _ in fit + evals], prepend_bos))
        if len(lengths) != 1:
            raise TLBackwardError(
                f"{k}-shot prompts have token lengths {sorted(lengths)}: RA maps are averaged and added "
                "cell by cell, so every prompt needs the same length; filter the pairs with "
                "constant_length_pairs(model, pairs)")
        fit_ids = answer_ids(model, [t for _, t in fit])
        ans = answer_ids(model, [t for _, t in evals])
        prompts = [p for p, _ in evals]
        mean = mean_over(model, [p for p, _ in fit], fit_ids, layers=layers, batch_size=batch_size,
                         prepend_bos=prepend_bos, progress=progress,
                         checkpoint=checkpoint_part(checkpoint, f"{k}shot.mean"))
        base = dict(n_shots=k, n_test=len(evals), prompt_len=lengths.pop())
        fit_loss[k] = float(mean.metric)
        run = dict(batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
        scored = evaluate(model, prompts, ans, **run, checkpoint=checkpoint_part(checkpoint, f"{k}shot.none"))
        rows.append(ICLRow(**base, method="none", eta=0.0, **topk_scores(*scored)))
        for eta in etas:
            if eta == 0:
                continue
            for method, delta in (("reversed", mean), ("forward", mean.patterns)):
                with patch_attention(model, delta, eta=eta, layers=list(mean.layers)):
                    scored = evaluate(model, prompts, ans, **run,
                                      checkpoint=checkpoint_part(checkpoint, f"{k}shot.{method}.{eta:g}"))
                rows.append(ICLRow(**base, method=method, eta=eta, **topk_scores(*scored)))
    result = ICLPatching(rows=tuple(rows), n_train=n_train, n_test=len(test), seed=seed,
                         fit_loss=FrozenDict(fit_loss), fit_source="train" if fit_queries is None else "fit_queries",
                         model=getattr(model.cfg, "model_name", type(model.original_model).__name__))
    if verbose:
        print(result.table())
    return result


def format_icl_table(result: ICLPatching) -> str:
    """``result.table()``: kept for code written when :func:`icl_patching` returned a dict."""
    return result.table()


def to_frame(result: ICLPatching):
    """``result.to_frame()``: the rows as a pandas DataFrame (pandas is optional)."""
    return result.to_frame()
