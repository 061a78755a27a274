"""The report as plain text: the summary the CLI prints (duck-typed on :class:`~tl_backward.report.result.Report`)."""

from __future__ import annotations

from typing import Any

__all__ = ["summary_text", "token_text"]


def token_text(s: str) -> str:
    """A token for plain text: bare when unambiguous, quoted when it has edge spaces or odd chars."""
    return s if s and s.strip() == s and s.isprintable() and "'" not in s else repr(s)


def _pct(p: float) -> str:
    return f"{100 * p:.3g} %"


def summary_text(r: Any, k: int) -> str:
    lines = [f"model    {r.model_name}",
             f"prompt   {r.prompt!r} ({len(r.str_tokens)} tokens: {' | '.join(token_text(t) for t in r.str_tokens)})"]
    p0, rest = r.predictions[0], r.predictions[1:]
    lines.append(f"predicts {token_text(p0.token)} {_pct(p0.prob)}"
                 + (f"   (then {', '.join(f'{token_text(p.token)} {_pct(p.prob)}' for p in rest)})" if rest else ""))
    which = "the model's top prediction" if r.target_is_prediction else f"rank {r.target_rank} in the model's output"
    lines.append(f"target   {token_text(r.target.token)} ({which}): p = {_pct(r.target.prob)}, loss = -log p = {r.loss:.4g}")
    lines.append("")
    lines.append("Reversed Attention: heads the gradient points at (largest ‖RA‖_F first)")
    heads = r.top_heads(k)
    lines.append("  " + "   ".join(f"L{l}H{h} {v:.3g}" for l, h, v in heads))
    lines.append("")
    lines.append(f"Backward Lens at the last token {r.str_tokens[-1]!r}: per layer, what W_in reads (top of LL(x))")
    lines.append("and what a descent step writes through W_out (bottom of LL(δ)); the target's rank among")
    lines.append(f"{r.d_vocab} tokens, 0 = strongest (x counted from the top, δ from the bottom)")
    rows = r.lens_rows(k)
    reads = [" ".join(token_text(t) for t in row["reads"]) for row in rows]
    writes = [" ".join(token_text(t) for t in row["writes"]) for row in rows]
    wr, ww = max(12, *map(len, reads)), max(14, *map(len, writes))
    lines.append(f"  {'layer':<6}{'W_in reads':<{wr + 2}}{'W_out writes':<{ww + 2}}{'‖δ‖':>9}  target rank x / δ")
    for row, rd, wt in zip(rows, reads, writes):
        lines.append(f"  L{row['layer']:<5}{rd:<{wr + 2}}{wt:<{ww + 2}}{row['delta_norm']:>9.2e}  "
                     f"{row['x_rank']:>5} / {row['delta_rank']}")
    lines.append("")
    lines.append(f"Most affected layer (largest MLP weight gradient): L{r.flow_layer}"
                 + (" -- its forward and backward flow graphs are on the page" if r.flow else ""))
    for note in r.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
