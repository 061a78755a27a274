"""Backward Lens rendering: the table's content, escaping of hostile tokens, offline page."""

import dataclasses
import html
import re

import pytest

from tl_backward.lens import backward_lens
from tl_backward.lens.render import lens_table, norm_tokens, render_backward_lens, target_rank_plot

EVIL = "<img/src=x/onerror=alert(1)>"


class EvilTokenizer:
    """Decodes every id to a string that would run script if inserted as markup."""

    def decode(self, ids):
        return f"{EVIL}{ids[0]}</script>"


@pytest.fixture(scope="module")
def lens(gpt2_model):
    return backward_lens(gpt2_model, ["the capital of france is", "a dog"], " paris", modules="all",
                         top_k=3, prepend_bos=True)


def test_table_cells_are_top1_bottom1(lens):
    fig = lens_table(lens, "mlp_in", row=0)
    body = fig.fragment("x")
    cells = re.findall(r'<td style="background:[^"]*;color:[^"]*" data-value="[^"]*" title="[^"]*">([^<]*)</td>', body)
    assert len(cells) == len(lens.layers) * 6  # 2 layers x (BOS + 5 tokens)
    r = lens["mlp_in"]
    top, bottom = lens.decode(r.top_ids[-1, 0, :1])[0], lens.decode(r.bottom_ids[-1, 0, :1])[0]
    assert html.unescape(cells[0]) == f"{top} \\ {bottom}"  # last layer on top, first token
    rows = re.findall(r'<th class="tlb-rowhead">(L\d+)</th>', body)
    assert rows == ["L1", "L0"]


def test_zero_factors_are_marked_not_ranked(lens):
    """Last layer, earlier tokens: δ = 0 exactly; the table shows a dash, the plot a gap."""
    body = lens_table(lens, "mlp_out").fragment("x")
    assert "—" in body
    plot = target_rank_plot(lens, "mlp_out").fragment("x")
    # 5 earlier tokens: a point at layer 0 only; the last token and the prediction: both layers
    assert plot.count("<circle") == 5 * 1 + 2 + 2


def test_render_page_groups_shared_inputs(lens):
    pg = lens.render()
    titles = [f.title for f in pg.figures]
    assert sum("W_Q" in t for t in titles) == 1 and any("same input as k, v" in t for t in titles)
    assert any(t.startswith("Rank of target") for t in titles)
    assert render_backward_lens(lens, modules="o").figures[0].title.count("W_O") == 1
    with pytest.raises(KeyError, match="not projected"):
        render_backward_lens(lens, modules="mlp_gate")
    with pytest.raises(ValueError, match="row must be"):
        lens_table(lens, "mlp_in", row=2)


def test_hostile_tokens_are_escaped(lens):
    evil_factors = dataclasses.replace(
        lens.factors, str_tokens=[[EVIL + "</script>" for _ in row] for row in lens.factors.str_tokens])
    evil = dataclasses.replace(lens, tokenizer=EvilTokenizer(), factors=evil_factors)
    text = render_backward_lens(evil).to_html()
    assert EVIL not in text
    assert "<img" not in text.replace("&lt;img", "")
    benign = render_backward_lens(lens).to_html()
    assert text.count("</script>") == benign.count("</script>")  # no token closes a script
    assert html.escape(EVIL) in text or "\\u003cimg" in text


@pytest.mark.browser
def test_page_loads_offline(lens, tmp_path):
    from tests.browser import dom_after_scripts, network_requests, require_chromium

    require_chromium()
    path = lens.render().save(tmp_path / "lens.html")
    assert network_requests(path) == []
    dom = dom_after_scripts(path)
    assert "Backward Lens" in dom and "tlb-table" in dom
    assert norm_tokens(lens).title.startswith("‖δ‖")
