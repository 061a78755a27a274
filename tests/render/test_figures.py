"""Generic figures: props handed to circuitsvis, colour ranges, own HTML tables and SVG."""

import json
import re

import numpy as np
import pytest
import torch

from tl_backward.render import figures as F

TOKS = ["<bos>", " The", "<img src=x onerror=alert(1)>", "</script><b>x</b>"]


def props(fig):
    return json.loads(fig.props_json)


def test_attention_heads_signed_uses_symmetric_range_over_all_heads():
    ra = torch.zeros(2, 4, 4)
    ra[0, 1, 0], ra[1, 3, 2] = -0.03, 0.012
    p = props(F.attention_heads(ra, TOKS, signed=True, head_names=["L0H1", "L2H3"]))
    assert p["maxValue"] == pytest.approx(0.03) and p["minValue"] == pytest.approx(-0.03)
    assert p["maskUpperTri"] is True and p["tokens"] == TOKS
    assert p["attentionHeadNames"] == ["L0H1", "L2H3"]
    assert np.allclose(p["attention"], ra.numpy())  # the page keeps 6 significant digits (≤ 5e-6 relative)
    p = props(F.attention_heads(ra, TOKS, signed=True, max_abs=0.5, mask_upper_tri=False))
    assert (p["minValue"], p["maxValue"], p["maskUpperTri"]) == (-0.5, 0.5, False)
    p = props(F.attention_heads(torch.softmax(torch.randn(1, 4, 4), -1), TOKS))
    assert (p["minValue"], p["maxValue"]) == (0.0, 1.0)
    p = props(F.attention_heads(torch.zeros(1, 4, 4), TOKS, signed=True))
    assert p["maxValue"] == 1.0  # all-zero map: still a valid range


def test_attention_heads_cleans_sentinels_before_range():
    ra = torch.full((1, 4, 4), 0.01)
    ra[0, 0, 3] = torch.finfo(torch.float32).min
    ra[0, 1, 3] = float("nan")
    p = props(F.attention_heads(ra, TOKS, signed=True))
    assert p["maxValue"] == pytest.approx(0.01)
    assert p["attention"][0][0][3] == 0.0 and p["attention"][0][1][3] == 0.0


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 4), "3 dimensions"),
    (torch.zeros(1, 3, 3), r"\[heads, 4, 4\]"),
])
def test_attention_heads_rejects_bad_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        F.attention_heads(bad, TOKS)


def test_attention_heads_rejects_bad_names_and_tokens():
    with pytest.raises(ValueError, match="head_names"):
        F.attention_heads(torch.zeros(2, 4, 4), TOKS, head_names=["a"])
    with pytest.raises(TypeError, match="tokens must be a list"):
        F.attention_heads(torch.zeros(1, 4, 4), "abcd")


def test_attention_pattern_mask():
    m = torch.tril(torch.ones(4, 4))
    p = props(F.attention_pattern(m, TOKS, mask_upper_tri=False))
    assert p["maskUpperTri"] is False and (p["minValue"], p["maxValue"]) == (0.0, 1.0)
    assert "positiveColor" not in p
    p = props(F.attention_pattern(m, TOKS, positive_color="#6a3d9a"))
    assert p["positiveColor"] == "#6a3d9a"
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        F.attention_pattern(torch.ones(4, 3), TOKS)


def test_colored_tokens_ranges():
    p = props(F.colored_tokens(TOKS, [0.0, 1.0, 2.0, 4.0]))
    assert (p["minValue"], p["maxValue"]) == (0.0, 4.0)
    p = props(F.colored_tokens(TOKS, np.array([0.0, -3.0, 2.0, 1.0])))
    assert (p["minValue"], p["maxValue"]) == (-3.0, 3.0)
    with pytest.raises(ValueError, match="4 tokens"):
        F.colored_tokens(TOKS, [1.0])


def test_colored_tokens_multi():
    p = props(F.colored_tokens_multi(TOKS, torch.ones(4, 2), ["L0", "L1"]))
    assert p["labels"] == ["L0", "L1"] and len(p["values"]) == 4
    with pytest.raises(ValueError, match="labels"):
        F.colored_tokens_multi(TOKS, torch.ones(4, 2), ["L0"])


def _cells(html):
    return re.findall(r'<td style="background:(rgb\([^)]*\)|#eee)[^"]*"[^>]*>(.*?)</td>', html)


def test_heatmap_table_colours_text_and_escaping():
    v = torch.tensor([[0.0, 1.0], [2.0, float("nan")]])
    fig = F.heatmap_table(v, ["L0", "L<1>"], TOKS[2:], title="norms", colour="purple",
                          hover=[["a\nb", "c"], ["d", TOKS[2]]])
    html = fig.html
    cells = _cells(html)
    assert [c[0] for c in cells] == ["rgb(255,255,255)", "rgb(180,158,204)", "rgb(106,61,154)", "#eee"]
    assert [c[1] for c in cells[:3]] == ["0", "1", "2"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img" not in html
    assert "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in html and "L&lt;1&gt;" in html
    assert 'title="a\nb"' in html
    assert not fig.needs_bundle


def test_heatmap_table_diverging_and_cell_text():
    v = np.array([[-2.0, 0.0, 1.0]])
    html = F.heatmap_table(v, ["r"], ["a", "b", "c"], colour="diverging",
                           cell_text=[["x \\ y", "<i>", "z"]], fmt=".2f").html
    bgs = [c[0] for c in _cells(html)]
    assert bgs[0] == "rgb(214,39,40)"  # most negative: full red
    assert bgs[1] == "rgb(255,255,255)"  # zero: white
    r, g, b = map(int, re.findall(r"\d+", bgs[2]))
    assert b > r and b > g  # positive: blue
    assert "x \\ y" in html and "&lt;i&gt;" in html


def test_heatmap_table_validation():
    with pytest.raises(ValueError, match="does not match"):
        F.heatmap_table(np.zeros((2, 2)), ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="colour"):
        F.heatmap_table(np.zeros((1, 1)), ["a"], ["b"], colour="rainbow")
    with pytest.raises(ValueError, match="hover"):
        F.heatmap_table(np.zeros((1, 2)), ["a"], ["b", "c"], hover=[["x"]])


def test_line_plot_svg():
    fig = F.line_plot({"rank <t>": [10, 5, float("nan"), 1], "other": [1, 2, 3, 4]},
                      x_labels=["L0", "L1", "L2", TOKS[2]], y_label="rank", title="ranks",
                      invert_y=True)
    html = fig.html
    assert html.startswith("<svg") and html.endswith("</svg>")
    assert html.count("<polyline") == 3  # NaN splits the first series into two segments
    assert html.count("<circle") == 7
    assert "rank &lt;t&gt;" in html and "<img" not in html
    # invert_y: the smallest value (1) is drawn at the top of the plot
    ys = {t: float(y) for y, t in re.findall(r'cy="([\d.]+)" r="3" fill="#1f77b4"><title>[^:]*: (\d+)<', html)}
    assert ys["1"] < ys["10"]
    with pytest.raises(ValueError, match="expected"):
        F.line_plot({"a": [1, 2]}, x_labels=["x"])
    with pytest.raises(ValueError, match="non-empty"):
        F.line_plot({}, x_labels=["x"])


def test_line_plot_log_axis():
    html = F.line_plot({"rank": [1000, 100, 0, 1]}, x_labels=["L0", "L1", "L2", "L3"],
                       log_y=True, invert_y=True).html
    assert html.count("<circle") == 3  # rank 0 cannot sit on a log axis: gap
    labels = re.findall(r'text-anchor="end">([^<]+)<', html)
    assert labels == ["1", "10", "100", "1000"]
    cy = [float(y) for y in re.findall(r'cy="([\d.]+)"', html)]
    # equal ratios -> equal spacing; inverted: 1 on top
    assert cy[0] > cy[1] > cy[2]
    assert abs((cy[0] - cy[1]) - (cy[1] - cy[2]) / 2) < 0.2
    with pytest.raises(ValueError, match="positive"):
        F.line_plot({"a": [1.0]}, x_labels=["x"], log_y=True, y_range=(0, 10))
