"""Rendering Reversed Attention: offline-safe HTML, escaped tokens, signed scale, heatmaps."""

import dataclasses
import html
import json
import re

import pytest

from tl_backward.attention import rank_heads, reversed_attention
from tl_backward.render.page import Page

EVIL = "<img src=x onerror=alert(1)>"
CLOSER = "</script><b>x</b>"
# circuitsvis.md §4.6: no remote script, stylesheet, import or CDN reference (the inlined bundle
# holds inert URL strings -- XML namespaces, an error-decoder link -- that load nothing).
REMOTE = re.compile(r"<script[^>]*\bsrc\s*=|<link\b|@import|unpkg|cdn\.jsdelivr", re.I)


@pytest.fixture(scope="module")
def ra(gpt2_model):
    return reversed_attention(gpt2_model, ["the cat sat on the mat", "the dog ran"], [" big", " cat"],
                              prepend_bos=True)


def _props(text: str, component: str) -> list[dict]:
    """The JSON props of every mount of ``component`` (decoded from the script-safe form)."""
    out = []
    for m in re.finditer(r'CircuitsVis\["' + component + r'"\],(\{.*?\})\);\}catch', text):
        out.append(json.loads(m.group(1)))
    return out


def test_page_structure_and_signed_scale(ra):
    page = ra.render(k=3, row=1)
    assert isinstance(page, Page)
    text = page.to_html()
    heads = _props(text, "AttentionHeads")
    assert len(heads) == 2  # RA maps, then forward patterns
    ra_props, fwd_props = heads
    n = int(ra.mask[1].sum())
    assert len(ra_props["attention"]) == 3 and len(ra_props["attention"][0]) == n  # cropped to the real tokens
    m = max(abs(v) for head in ra_props["attention"] for row in head for v in row)
    # the page rounds map values to 6 significant digits (≤ 5e-6 relative), the scale is not rounded
    assert ra_props["maxValue"] == pytest.approx(m, rel=1e-5) and ra_props["minValue"] == -ra_props["maxValue"]
    assert fwd_props["minValue"] == 0 and fwd_props["maxValue"] == 1
    assert ra_props["maskUpperTri"] is True
    assert ra_props["tokens"] == ra.str_tokens[1][:n]
    top = sorted(((float(v), l, h) for l, row in enumerate(ra.head_norms(per_example=True)[:, 1])
                  for h, v in enumerate(row)), reverse=True)[:3]
    assert ra_props["attentionHeadNames"] == [f"L{l}H{h}" for _, l, h in top]
    assert "‖RA‖_F per head" in text and "‖P‖_F per head" in text and "tlb-table" in text


def test_saved_html_is_offline_and_escapes_tokens(ra, tmp_path):
    evil = dataclasses.replace(ra, str_tokens=[[EVIL, CLOSER, *row[2:]] for row in ra.str_tokens])
    path = evil.render(k=2).save(tmp_path / "ra.html")
    text = path.read_text(encoding="utf-8")
    assert not REMOTE.search(text)
    assert EVIL not in text and "<b>x</b>" not in text
    benign = ra.render(k=2).to_html()
    assert text.count("</script>") == benign.count("</script>")  # no token closes a script
    assert html.escape(EVIL) in text  # the input line shows it as text
    props = _props(text, "AttentionHeads")[0]
    assert props["tokens"][:2] == [EVIL, CLOSER]  # canvas-drawn tokens arrive as exact strings


def test_mean_and_ranking_pages(gpt2_model, ra):
    mean = ra.mean(align="end")
    text = mean.render(k=2).to_html()
    assert "mean over 2 prompts" in text and "first prompt" in text
    ranking = rank_heads(gpt2_model, ["the cat sat", "the dog ran"], [" big", " cat"], progress=False)
    rtext = ranking.render().to_html()
    assert rtext.count("<table") == 4 and "mean ‖RA‖_F over 2 prompts" in rtext
    assert not REMOTE.search(rtext)


@pytest.mark.browser
def test_page_loads_offline_in_chromium(ra, tmp_path):
    from tests.browser import dom_after_scripts, network_requests, parse_dom, require_chromium

    require_chromium()
    evil = dataclasses.replace(ra, str_tokens=[[EVIL, *row[1:]] for row in ra.str_tokens])
    path = evil.render(k=2).save(tmp_path / "ra.html")
    assert network_requests(path) == []
    tree = parse_dom(dom_after_scripts(path))
    assert tree.all_tags.get("img", 0) == 0, "a token was parsed as an <img> element"
    mounts = [el for i, el in tree.by_id.items() if i.endswith("-cv")]
    assert len(mounts) == 2  # RA maps and forward patterns
    for el in mounts:
        assert el["tags"].get("canvas", 0) == 2 + 1  # one thumbnail per head + the zoomed map
        assert "circuitsvis failed" not in "".join(el["text"])
