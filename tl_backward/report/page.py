"""The report as one offline HTML page: header, Reversed Attention, Backward Lens, flow graphs."""

from __future__ import annotations

from typing import Any

from ..attention.render import norms_figure, top_heads_figures
from ..lens.render import lens_table, norm_tokens, target_rank_plot
from ..render.page import Figure, Page, escape, html_figure

__all__ = ["report_page"]


_PAGE_CSS = """<style>
.tlb-fig:has(> .tlb-section){border:none;background:none;padding:0;margin:26px 0 4px 0}
.tlb-section h2{font-size:17px;margin:0 0 4px 0}
.tlb-section p{margin:0;color:#444;max-width:900px}
.tlb-head .tlb-prompt span{display:inline-block;border:1px solid #ccc;border-radius:3px;padding:0 4px;
  margin:0 2px 2px 0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;background:#f7f7f7}
.tlb-head table.tlb-preds{border-collapse:collapse;margin:6px 0}
.tlb-head table.tlb-preds td{padding:1px 8px 1px 0;font-size:13px}
.tlb-head .tlb-bar{display:inline-block;height:11px;background:#6a51a3;border-radius:2px;vertical-align:middle}
.tlb-head .tlb-target td{font-weight:600}
.tlb-head .tlb-caveat{background:#fff8e1;border-left:3px solid #f0b400;padding:4px 8px;margin:6px 0;color:#333}
.tlb-head dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:6px 0}
.tlb-head dt{color:#555}.tlb-head dd{margin:0}
</style>"""


def _section(title: str, text: str) -> Figure:
    return html_figure(f'<div class="tlb-section"><h2>{escape(title)}</h2><p>{text}</p></div>')


def _header(r: Any, heads: int) -> Figure:
    chips = "".join(f"<span>{escape(t)}</span>" for t in r.str_tokens)
    rows = []
    shown = list(r.predictions)
    if r.target.id not in [p.id for p in shown]:
        shown.append(r.target)
    for p in shown:
        cls = ' class="tlb-target"' if p.id == r.target.id else ""
        width = max(1, round(240 * p.prob))
        rows.append(f"<tr{cls}><td><code>{escape(repr(p.token))}</code></td>"
                    f'<td><span class="tlb-bar" style="width:{width}px"></span></td><td>{p.prob:.4f}</td>'
                    f"<td>{'&larr; target' if p.id == r.target.id else ''}</td></tr>")
    top = ", ".join(f"L{l}H{h}" for l, h, _ in r.top_heads(3))
    which = "the model's top prediction" if r.target_is_prediction else f"rank {r.target_rank} in the model's output"
    facts = (f"<dl><dt>model</dt><dd>{escape(r.model_name)}</dd>"
             f"<dt>target</dt><dd><code>{escape(repr(r.target.token))}</code> ({escape(which)}); "
             f"loss = &minus;log p = {r.loss:.4g}</dd>"
             f"<dt>top heads (‖RA‖_F)</dt><dd>{escape(top)}</dd>"
             f"<dt>most affected layer</dt><dd>L{r.flow_layer} (largest MLP weight gradient "
             f"{r.layer_grad_norms[r.flow_layer]:.3g})</dd></dl>")
    notes = "".join(f'<div class="tlb-caveat">{escape(n)}</div>' for n in r.notes)
    html = (_PAGE_CSS + '<div class="tlb-head">'
            f'<div class="tlb-prompt">{chips}</div>'
            f'<div class="tlb-note">The model\'s next-token probabilities at the last position:</div>'
            f'<table class="tlb-preds">{"".join(rows)}</table>{facts}{notes}</div>')
    return html_figure(html, title="What the model predicts")


def report_page(r: Any, heads: int) -> Any:
    ra, lens = r.reversed_attention, r.lens
    tgt = escape(repr(r.target.token))
    figs = [_header(r, heads)]
    figs.append(_section(
        "Which heads the gradient points at: Reversed Attention",
        f"RA = &part;L/&part;(q&middot;k) of the loss L = &minus;log p({tgt}), one map per head. "
        "Heads with a large ‖RA‖_F are where changing attention would change the answer most; "
        "compare with the forward patterns' ‖P‖_F."))
    figs.append(norms_figure(ra.head_norms(per_example=True)[:, 0], ra.layers, title="‖RA‖_F per head",
                             colour="purple"))
    figs.append(norms_figure(ra.head_norms("forward", per_example=True)[:, 0], ra.layers,
                             title="‖P‖_F per head (forward attention, for comparison)", colour="green"))
    figs += top_heads_figures(ra, k=heads)
    figs.append(_section(
        "What the gradient writes into each layer: Backward Lens",
        "The gradient of each MLP matrix is a sum over tokens of x &otimes; &delta;. Projected to "
        "the vocabulary with the logit lens: W_in's input x (top tokens: what the layer reads) and "
        "W_out's output gradient &delta; (bottom tokens: what a descent step writes, since it adds "
        "&minus;&delta;). Hover a cell for the top/bottom-5 and the target's rank."))
    figs.append(lens_table(lens, "mlp_out"))
    figs.append(lens_table(lens, "mlp_in"))
    figs.append(target_rank_plot(lens, "mlp_out"))
    figs.append(norm_tokens(lens, "mlp_out"))
    if r.flow:
        figs.append(_section(
            f"How information flows: VISIT flow graphs of layer {r.flow_layer}",
            f"Layer {r.flow_layer} gets the largest MLP weight gradient. Forward graph: what each "
            "component contributes at the last token, labelled by its logit-lens token. Backward graph: "
            "the same components carrying the gradient. Click a node to highlight its paths."))
        figs += [g.render() for g in r.flow]
    return Page(figs, title=f"tl-backward report: {r.prompt}")
