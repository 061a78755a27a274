"""Pictures of Reversed Attention: layer × head norm heatmaps and the top heads' maps.

Conventions (docs/reversed_attention.md; circuitsvis's AttentionHeads): layers on x, heads on y; ‖RA‖_F in
purples, ‖P‖_F in greens, raw values. RA maps on a diverging scale centred at 0 with a symmetric
range ±max|RA| over the heads shown (negative = helpful edge = red, positive = harmful = blue);
forward patterns on 0..1; the future triangle greyed. Every token is escaped by the figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..render.figures import attention_heads, heatmap_table
from ..render.page import Figure, Page, escape

__all__ = ["norms_figure", "top_heads_figures", "reversed_attention_page", "head_ranking_page"]

_SIGN_NOTE = ("Signed scale centred at 0: <b>red = negative</b> (raising this q&middot;k logit would "
              "<i>lower</i> the loss: a helpful edge), <b>blue = positive</b> (it would raise the loss). "
              "Range &plusmn;{m:.3g} (max |RA| over the heads shown).")


def _with_note(fig: Figure, note_html: str) -> Figure:
    return dataclasses.replace(fig, html=f'<div class="tlb-note">{note_html}</div>' + fig.html)


def norms_figure(norms: Any, layers: Any, *, title: str, colour: str = "purple",
                 std: Any = None) -> Figure:
    """Heatmap of ``norms`` ``[layer, head]`` drawn heads × layers (layers on x); hover shows
    ``L{l}H{h}`` and the value (± ``std`` when given)."""
    layers = list(layers)
    values = norms.detach().float().cpu().T  # [head, layer]
    n_heads = values.shape[0]
    hover = [[f"L{l}H{h}: {float(values[h, i]):.4g}" + (f" ± {float(std[i, h]):.3g}" if std is not None else "")
              for i, l in enumerate(layers)] for h in range(n_heads)]
    return heatmap_table(values, [f"H{h}" for h in range(n_heads)], [f"L{l}" for l in layers],
                         title=title, colour=colour, hover=hover, corner="head \\ layer")


def top_heads_figures(ra: Any, *, k: int = 10, row: int = 0) -> list[Figure]:
    """The top-``k`` heads of ``row`` by ‖RA‖_F: their RA maps (signed) and forward patterns."""
    norms = ra.head_norms(per_example=True)[:, row]  # [layer, head]
    k = max(1, min(int(k), norms.numel()))
    vals, idx = norms.flatten().topk(k)
    H = norms.shape[1]
    picks = [(int(i) // H, int(i) % H) for i in idx]
    n = int(ra.mask[row].sum())
    toks = list(ra.str_tokens[row])[:n]
    ra_maps = ra.maps[:, row][[li for li, _ in picks], [h for _, h in picks]][:, :n, :n]
    fwd_maps = ra.patterns[:, row][[li for li, _ in picks], [h for _, h in picks]][:, :n, :n]
    names = [f"L{ra.layers[li]}H{h}" for li, h in picks]
    listing = ", ".join(f"{nm} {float(v):.3g}" for nm, v in zip(names, vals))
    m = float(ra_maps.abs().max()) or 1.0
    ra_fig = attention_heads(ra_maps, toks, head_names=names, signed=True, max_abs=m,
                             title=f"Reversed Attention of the top {k} heads by ‖RA‖_F")
    fwd_fig = attention_heads(fwd_maps, toks, head_names=names,
                              title="Forward attention patterns of the same heads (0..1)")
    note = _SIGN_NOTE.format(m=m) + f"<br>‖RA‖_F: {escape(listing)}"
    return [_with_note(ra_fig, note), fwd_fig]


def reversed_attention_page(ra: Any, *, k: int = 10, row: int = 0, title: str | None = None) -> Page:
    """Norm heatmaps (‖RA‖_F, ‖P‖_F) for prompt ``row``, then its top-``k`` heads' maps."""
    row = ra._row(row)
    n = int(ra.mask[row].sum())
    text = " ".join(ra.str_tokens[row][:n])
    if title is None:
        title = "Reversed Attention"
        if ra.align is not None:
            title += f" (mean over {ra.n_examples} prompts, align={ra.align})"
    figs = []
    if ra.align is not None:
        figs.append(Figure(html=f'<div class="tlb-note">Tokens shown are those of the first prompt '
                                f'(positions are {escape(ra.align)}-aligned).</div>'))
    figs.append(Figure(html=f'<div class="tlb-note">Input: <code>{escape(text)}</code> &mdash; '
                            f'metric {float(ra.metric):.4g}</div>'))
    norms = ra.head_norms(per_example=True)[:, row]
    fwd = ra.head_norms("forward", per_example=True)[:, row]
    figs.append(norms_figure(norms, ra.layers, title="‖RA‖_F per head", colour="purple"))
    figs.append(norms_figure(fwd, ra.layers, title="‖P‖_F per head (forward attention)", colour="green"))
    figs += top_heads_figures(ra, k=k, row=row)
    return Page(figs, title=title)


def head_ranking_page(ranking: Any, *, title: str | None = None) -> Page:
    """Mean and std of ‖RA‖_F (purples) and ‖P‖_F (greens) over a dataset, layers × heads."""
    n = ranking.n_examples
    figs = [
        norms_figure(ranking.reversed_mean, ranking.layers, std=ranking.reversed_std,
                     title=f"mean ‖RA‖_F over {n} prompts", colour="purple"),
        norms_figure(ranking.reversed_std, ranking.layers, title="std ‖RA‖_F", colour="purple"),
        norms_figure(ranking.forward_mean, ranking.layers, std=ranking.forward_std,
                     title=f"mean ‖P‖_F over {n} prompts", colour="green"),
        norms_figure(ranking.forward_std, ranking.layers, title="std ‖P‖_F", colour="green"),
    ]
    top = ", ".join(f"L{l}H{h} ({v:.3g})" for l, h, v in ranking.top(10))
    figs.insert(0, Figure(html=f'<div class="tlb-note">Top heads by mean ‖RA‖_F: {escape(top)}</div>'))
    return Page(figs, title=title or "Head ranking by Reversed Attention norm")
