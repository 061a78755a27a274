"""The Backward Lens pictures use the terminal summary's rank convention (0 = strongest; x counted
from the top, δ from the bottom) and say so; zero-factor cells are explained on the figure."""

import html
import re

import pytest
import torch

from tl_backward.core.adapter import get_adapter
from tl_backward.errors import TLBackwardError
from tl_backward.report import build_report
from tl_backward.lens.render import ZERO_MARK, lens_table, rank_as_read, target_rank_plot

PROMPT = "the capital of france is"


@pytest.fixture(scope="module")
def report(gpt2_model):
    return build_report(gpt2_model, PROMPT, target=" rome", flow=False)


def _points(fig):
    """{series: [(x label, value, cy)]} from the line plot's hover titles and circles."""
    out = {}
    for cy, title in re.findall(r'<circle cx="[^"]*" cy="([^"]*)" r="3" fill="[^"]*"><title>([^<]*)</title>',
                                fig.html):
        name, rest = html.unescape(title).rsplit(", ", 1)
        x, value = rest.split(": ")
        out.setdefault(name, []).append((x, float(value), float(cy)))
    return out


def _independent_ranks(model, report, module):
    """The target's rank at the last token per layer, straight from LL(v) = ln_final(v) W_U + b_U:
    from the top for x (count of larger logits), from the bottom for δ (count of smaller ones)."""
    ad, lens = get_adapter(model), report.lens
    t = lens.factors.n_tokens - 1
    out = []
    for l in lens.layers:
        f = lens.factors[l, module]
        v = f.x[t] if module == "mlp_in" else f.delta[t]
        with torch.no_grad():
            logits = ad.ln_final(v.to(ad.W_U.dtype)) @ ad.W_U + ad.b_U
        own = logits[report.target.id]
        out.append(int((logits > own).sum()) if module == "mlp_in" else int((logits < own).sum()))
    return out


@pytest.mark.parametrize("module", ["mlp_out", "mlp_in"])
def test_rank_plot_agrees_with_the_summary_and_the_logits(gpt2_model, report, module):
    fig = target_rank_plot(report.lens, module)
    last = next(v for k, v in _points(fig).items() if k.startswith(f"{report.lens.factors.n_tokens - 1}:"))
    plotted = [v for _, v, _ in last]
    key = "delta_rank" if module == "mlp_out" else "x_rank"
    summary = [row[key] for row in reversed(report.lens_rows())]  # lens_rows lists the last layer first
    assert plotted == summary
    assert plotted == _independent_ranks(gpt2_model, report, module)
    assert "0 = strongest" in fig.title and ("from the bottom" in fig.title) == (module == "mlp_out")
    # 0 is drawn at the top: a smaller rank never sits lower on the chart
    pts = sorted((v, cy) for series in _points(fig).values() for _, v, cy in series)
    assert all(a[1] <= b[1] for a, b in zip(pts, pts[1:]))


def test_table_hover_uses_the_same_ranks_and_explains_the_dash(report):
    lens = report.lens
    fig = lens_table(lens, "mlp_out")
    titles = [html.unescape(t) for t in re.findall(r'title="([^"]*)"', fig.html)]
    ranks = rank_as_read(lens, "mlp_out")
    t = lens.factors.n_tokens - 1
    top_layer = lens.layers[-1]  # the table lists the last layer first
    hover = next(h for h in titles if h.startswith(f"layer {top_layer}, token {t} "))
    assert f"rank {int(ranks[lens.layer_index(top_layer), t])} of {lens.d_vocab}" in hover
    assert "0 = strongest" in hover and "from the bottom" in hover
    # the last layer's δ is exactly zero before the scored position: dash, explained in the caption
    assert (lens["mlp_out"].norm[-1, :-1] == 0).all()
    assert f">{ZERO_MARK}<" in fig.html and f"{ZERO_MARK} = the factor is exactly zero" in fig.html
    # x never vanishes here: no dash, so no note
    assert ZERO_MARK not in lens_table(lens, "mlp_in").html


def test_rank_as_read_validates(report):
    with pytest.raises(TLBackwardError) as e:
        rank_as_read(report.lens, "mlp_out", which="both")
    assert e.value.argument == "which"
