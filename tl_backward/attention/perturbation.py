"""Head perturbation study (Katz & Wolf, NAACL 2025; docs/reversed_attention.md): keep the top fraction
f of heads under a ranking, zero-ablate the rest (``hook_z`` zeroed per head, b_O kept; weights
untouched), and score top-1/2/3 accuracy on test prompts, for f in {0, 0.1, ..., 1}.

Rankings: ``"reversed"`` (mean ‖RA‖_F over training prompts), ``"forward"`` (mean ‖P‖_F) and
``"random"`` (seeded shuffle); each optionally also in ascending order (``"<name>_asc"``, least
important first -- the paper's reversed ranking). A ranking whose top heads matter keeps accuracy
high at small f, and its reversal loses it fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from ..core.results import Record
from ..core.sweep import checkpoint_part
from ..errors import TLBackwardError
from .icl import PAPER_SHOTS, Pair, answer_ids, icl_prompts, topk_hits, topk_scores
from .patching import zero_heads
from .ranking import HeadRanking, rank_heads

__all__ = ["PAPER_FRACTIONS", "head_perturbation", "icl_perturbation", "format_perturbation_table",
           "HeadPerturbation", "PerturbationRow", "ICLPerturbation"]

PAPER_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class PerturbationRow(Record):
    """One (ranking, kept fraction) cell of :func:`head_perturbation`: the top ``n_kept`` heads of
    ``ranking`` kept, the rest zero-ablated; top-1/2/3 accuracy (%) of the answer's first token."""

    ranking: str
    fraction: float
    n_kept: int
    top1: float
    top2: float
    top3: float

    def __repr__(self) -> str:
        return (f"PerturbationRow({self.ranking}, keep {self.fraction:.0%} ({self.n_kept} heads): "
                f"top-1/2/3 {self.top1:.1f}/{self.top2:.1f}/{self.top3:.1f} %)")


@dataclass(frozen=True)
class HeadPerturbation(Record):
    """Result of :func:`head_perturbation`: one :class:`PerturbationRow` per (ranking, fraction), in
    run order, and the :class:`~tl_backward.attention.ranking.HeadRanking` the orders came from
    (computed on ``n_train`` training prompts; scored on ``n_test`` test prompts; ``n_heads`` in all)."""

    rows: tuple[PerturbationRow, ...]
    ranking: HeadRanking = field(repr=False, compare=False)
    n_heads: int
    n_test: int
    n_train: int
    seed: int

    def __repr__(self) -> str:
        names = tuple(dict.fromkeys(r.ranking for r in self.rows))
        n_f = len({r.fraction for r in self.rows})
        return (f"HeadPerturbation({self.n_heads} heads; rankings {', '.join(names)} x {n_f} fractions; "
                f"{self.n_train} train / {self.n_test} test prompts)")

    def row(self, ranking: str, fraction: float) -> PerturbationRow:
        """The row of ``ranking`` (e.g. ``"reversed_asc"``) at kept ``fraction``."""
        for r in self.rows:
            if r.ranking == ranking and r.fraction == float(fraction):
                return r
        names = list(dict.fromkeys(r.ranking for r in self.rows))
        if ranking not in names:
            raise TLBackwardError(f"ranking={ranking!r} was not run; pass one of {names}", argument="ranking")
        raise TLBackwardError(f"fraction={fraction!r} was not run; pass one of "
                              f"{sorted({r.fraction for r in self.rows})}", argument="fraction")

    def table(self) -> str:
        """Markdown table: top-1 accuracy (%) per kept fraction (rows) and ranking (columns)."""
        names = list(dict.fromkeys(r.ranking for r in self.rows))
        fractions = list(dict.fromkeys(r.fraction for r in self.rows))
        lines = [f"Head perturbation -- keep the top fraction of {self.n_heads} heads, zero the rest; "
                 f"top-1 accuracy (%) on {self.n_test} test prompts (top-1/2/3 in the returned rows)",
                 "", "| kept | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for f in fractions:
            cells = [self.row(n, f) for n in names]
            lines.append(f"| {f:.0%} ({cells[0].n_kept}) | " + " | ".join(f"{c.top1:.1f}" for c in cells) + " |")
        return "\n".join(lines)

    def to_frame(self):
        """The rows as a pandas DataFrame (pandas is optional: imported here only)."""
        import pandas as pd

        return pd.DataFrame([r.to_dict() for r in self.rows], columns=[*PerturbationRow.__dataclass_fields__])


@dataclass(frozen=True)
class ICLPerturbation(Record):
    """Result of :func:`icl_perturbation`: one :class:`HeadPerturbation` per ``n_shots``.

    Reads as the mapping ``{n_shots: HeadPerturbation}`` it used to be (``result[5]``,
    ``result.items()``, ``sorted(result)``); ``runs[i]`` belongs to ``n_shots[i]``.
    """

    n_shots: tuple[int, ...]
    runs: tuple[HeadPerturbation, ...]

    def __repr__(self) -> str:
        heads = self.runs[0].n_heads if self.runs else 0
        return f"ICLPerturbation(shots {self.n_shots}; {heads} heads; {sum(len(r.rows) for r in self.runs)} rows)"

    def __getitem__(self, n_shots: int) -> HeadPerturbation:
        if n_shots not in self.n_shots:
            raise KeyError(f"n_shots={n_shots!r} was not run; runs: {list(self.n_shots)}")
        return self.runs[self.n_shots.index(n_shots)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.n_shots)

    def __len__(self) -> int:
        return len(self.n_shots)

    def table(self) -> str:
        """Each run's :meth:`HeadPerturbation.table` under a ``== k-shot ==`` heading."""
        return "\n\n".join(f"== {k}-shot ==\n{run.table()}" for k, run in zip(self.n_shots, self.runs))

    def to_frame(self):
        """Every run's rows with an ``n_shots`` column, as a pandas DataFrame (pandas optional)."""
        import pandas as pd

        cols = ["n_shots", *PerturbationRow.__dataclass_fields__]
        return pd.DataFrame([{"n_shots": k, **r.to_dict()} for k, run in zip(self.n_shots, self.runs)
                             for r in run.rows], columns=cols)


def head_perturbation(
    model: Any,
    train_prompts: Sequence[str],
    train_targets: Sequence[str],
    test_prompts: Sequence[str],
    test_targets: Sequence[str],
    *,
    rankings: Sequence[str] = ("reversed", "forward", "random"),
    fractions: Sequence[float] = PAPER_FRACTIONS,
    include_reversed: bool = True,
    ranking: HeadRanking | None = None,
    seed: int = 0,
    batch_size: int = 32,
    prepend_bos: bool = True,
    progress: bool = False,
    verbose: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> HeadPerturbation:
    """Accuracy when only the top ``f`` of heads (by each ranking) are kept.

    Targets are strings (``" y"``); accuracy is scored on their first token. The head ranking is
    computed on the training prompts with :func:`tl_backward.rank_heads` unless ``ranking`` is given.
    Returns a :class:`HeadPerturbation` (one :class:`PerturbationRow` per ranking and fraction,
    accuracies in %, and the ranking used) and prints its table when ``verbose``. The ranking and
    every evaluation are dataset sweeps (core/sweep.py): sharded under ``torchrun`` with every rank
    returning the same result; ``checkpoint=path`` keeps one file per sub-sweep
    (``path.ranking``, ``path.{ranking}.{fraction}``) so a restarted run skips what is done.
    """
    for f in fractions:
        if not 0.0 <= float(f) <= 1.0:
            raise TLBackwardError(f"fractions must lie in [0, 1], got {f!r}", argument="fractions")
    unknown = [r for r in rankings if r not in ("reversed", "forward", "random")]
    if unknown:
        raise TLBackwardError(f"rankings must be among 'reversed', 'forward', 'random'; got {unknown}",
                              argument="rankings")
    if ranking is None:
        ranking = rank_heads(model, list(train_prompts), answer_ids(model, train_targets),
                             batch_size=batch_size, prepend_bos=prepend_bos, progress=progress,
                             checkpoint=checkpoint_part(checkpoint, "ranking"))
    orders = {}
    for name in rankings:
        orders[name] = ranking.order(name, seed=seed)
        if include_reversed and name != "random":
            orders[name + "_asc"] = ranking.order(name, descending=False)
    all_heads = orders[next(iter(orders))]
    answers = answer_ids(model, test_targets)
    rows = []
    for name, order in orders.items():
        for f in fractions:
            n_kept = round(float(f) * len(all_heads))
            with zero_heads(model, order[n_kept:]):
                hits = topk_hits(model, list(test_prompts), answers, batch_size=batch_size, prepend_bos=prepend_bos,
                                 progress=progress, checkpoint=checkpoint_part(checkpoint, f"{name}.{float(f):g}"))
            rows.append(PerturbationRow(ranking=name, fraction=float(f), n_kept=n_kept, **topk_scores(hits)))
    result = HeadPerturbation(rows=tuple(rows), ranking=ranking, n_heads=len(all_heads), n_test=len(test_prompts),
                              n_train=len(train_prompts), seed=seed)
    if verbose:
        print(result.table())
    return result


def icl_perturbation(
    model: Any,
    train: Sequence[Pair],
    test: Sequence[Pair],
    *,
    n_shots: Sequence[int] = PAPER_SHOTS,
    n_train: int = 25,
    fit_queries: Sequence[Pair] | None = None,
    seed: int = 0,
    verbose: bool = True,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> ICLPerturbation:
    """:func:`head_perturbation` on k-shot ICL prompts built from (x, y) pairs (template and
    demonstration sampling as in :mod:`tl_backward.attention.icl`), one run per ``n_shots``. The
    heads are ranked on the first ``n_train`` of ``fit_queries`` (default: of ``train``).
    Returns an :class:`ICLPerturbation`, which reads as ``{n_shots: HeadPerturbation}``.
    ``checkpoint=path``: each run resumes from ``path.{k}shot.*`` (see :func:`head_perturbation`)."""
    queries = list(train if fit_queries is None else fit_queries)[:n_train]
    if not queries:
        raise TLBackwardError("no queries to rank the heads on: pass non-empty train or fit_queries", argument="train")
    runs = []
    for k in n_shots:
        fit = icl_prompts(train, queries, k, seed=seed)
        evals = icl_prompts(train, test, k, seed=seed + 1)
        if verbose:
            print(f"\n== {k}-shot ==")
        runs.append(head_perturbation(model, [p for p, _ in fit], [t for _, t in fit], [p for p, _ in evals],
                                      [t for _, t in evals], seed=seed, verbose=verbose,
                                      checkpoint=checkpoint_part(checkpoint, f"{k}shot"), **kwargs))
    return ICLPerturbation(n_shots=tuple(n_shots), runs=tuple(runs))


def format_perturbation_table(result: HeadPerturbation) -> str:
    """``result.table()``: kept for code written when :func:`head_perturbation` returned a dict."""
    return result.table()
