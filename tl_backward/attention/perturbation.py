"""Head perturbation study (Katz & Wolf, NAACL 2025; docs/reversed_attention.md): keep the top fraction f of heads under a
ranking, zero-ablate the rest (``hook_z`` zeroed per head, b_O kept; weights untouched), and score
top-1/2/3 accuracy on test prompts, for f in {0, 0.1, ..., 1}.

Rankings: ``"reversed"`` (mean ‖RA‖_F over training prompts), ``"forward"`` (mean ‖P‖_F) and
``"random"`` (seeded shuffle); each optionally also in ascending order (``"<name>_asc"``, least
important first -- the paper's reversed ranking). A ranking whose top heads matter keeps accuracy high at small f, and its
reversal loses it fast.
"""

from __future__ import annotations

from typing import Any, Sequence

from .patching import zero_heads
from .ranking import HeadRanking, rank_heads
from .icl import PAPER_SHOTS, Pair, topk_scores, answer_ids, icl_prompts, topk_hits

__all__ = ["PAPER_FRACTIONS", "head_perturbation", "icl_perturbation", "format_perturbation_table"]

PAPER_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))


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
) -> dict:
    """Accuracy when only the top ``f`` of heads (by each ranking) are kept.

    Targets are strings (``" y"``); accuracy is scored on their first token. The head ranking is
    computed on the training prompts with :func:`tl_backward.rank_heads` unless ``ranking`` is given.
    Returns ``{"rows": [{ranking, fraction, n_kept, top1, top2, top3}], "ranking": HeadRanking, ...}``
    (accuracies in %) and prints a table when ``verbose``.
    """
    for f in fractions:
        if not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"fractions must lie in [0, 1], got {f!r}")
    unknown = [r for r in rankings if r not in ("reversed", "forward", "random")]
    if unknown:
        raise ValueError(f"rankings must be among 'reversed', 'forward', 'random'; got {unknown}")
    if ranking is None:
        ranking = rank_heads(model, list(train_prompts), answer_ids(model, train_targets),
                             batch_size=batch_size, prepend_bos=prepend_bos, progress=progress)
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
                hits = topk_hits(model, list(test_prompts), answers, batch_size=batch_size, prepend_bos=prepend_bos)
            rows.append({"ranking": name, "fraction": float(f), "n_kept": n_kept, **topk_scores(hits)})
    result = {"rows": rows, "ranking": ranking, "n_heads": len(all_heads), "n_test": len(test_prompts),
              "n_train": len(train_prompts), "seed": seed}
    if verbose:
        print(format_perturbation_table(result))
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
    **kwargs: Any,
) -> dict:
    """:func:`head_perturbation` on k-shot ICL prompts built from (x, y) pairs (template and
    demonstration sampling as in :mod:`tl_backward.attention.icl`), one run per ``n_shots``. The
    heads are ranked on the first ``n_train`` of ``fit_queries`` (default: of ``train``).
    Returns ``{n_shots: result}``."""
    queries = list(train if fit_queries is None else fit_queries)[:n_train]
    if not queries:
        raise ValueError("no queries to rank the heads on: pass non-empty train or fit_queries")
    out = {}
    for k in n_shots:
        fit = icl_prompts(train, queries, k, seed=seed)
        evals = icl_prompts(train, test, k, seed=seed + 1)
        if verbose:
            print(f"\n== {k}-shot ==")
        out[k] = head_perturbation(model, [p for p, _ in fit], [t for _, t in fit], [p for p, _ in evals],
                                   [t for _, t in evals], seed=seed, verbose=verbose, **kwargs)
    return out


def format_perturbation_table(result: dict) -> str:
    """Markdown table: top-1 accuracy (%) per kept fraction (rows) and ranking (columns)."""
    rows = result["rows"]
    names = list(dict.fromkeys(r["ranking"] for r in rows))
    fractions = list(dict.fromkeys(r["fraction"] for r in rows))
    lines = [f"Head perturbation -- keep the top fraction of {result['n_heads']} heads, zero the rest; "
             f"top-1 accuracy (%) on {result['n_test']} test prompts (top-1/2/3 in the returned rows)",
             "", "| kept | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for f in fractions:
        cells = [next(r for r in rows if r["ranking"] == n and r["fraction"] == f) for n in names]
        lines.append(f"| {f:.0%} ({cells[0]['n_kept']}) | " + " | ".join(f"{c['top1']:.1f}" for c in cells) + " |")
    return "\n".join(lines)
