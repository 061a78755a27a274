"""Offline-safety, escaping and composition of tl_backward.render.page (no browser needed)."""

import json
import re
import socket
import urllib.request

import numpy as np
import pytest
import torch

from tl_backward.errors import TLBackwardError
from tl_backward.render import page as P
from tl_backward.render.figures import attention_heads, colored_tokens, heatmap_table, line_plot

XSS = ["<img src=x onerror=alert(1)>", "</script><b>x</b>", "a&b", "\"'q", "<!--", "\u2028"]
BUNDLE_MARK = "var CircuitsVis="


def _decode_props(fig):
    return json.loads(fig.props_json)


def _script_blocks(html):
    return re.findall(r"<script\b[^>]*>(.*?)</script>", html, flags=re.S | re.I)


def test_escape_text_and_attributes():
    assert P.escape("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert P.escape("\"'&") == "&quot;&#x27;&amp;"
    assert P.escape(3) == "3"


def test_script_json_cannot_close_script_and_roundtrips():
    payload = {"tokens": XSS, "x": 1}
    s = P.script_json(payload)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in s
    assert json.loads(s) == payload  # same strings after JSON decoding


def test_jsonable_replaces_nan_inf_and_sentinels():
    t = torch.tensor([[1.0, float("nan")], [float("inf"), torch.finfo(torch.float32).min]])
    assert P.jsonable(t) == [[1.0, 0.0], [0.0, 0.0]]
    a = np.array([np.nan, -np.inf, 0.25], dtype=np.float32)
    assert P.jsonable(a) == [0.0, 0.0, 0.25]
    assert P.jsonable(float("nan")) == 0.0
    assert P.jsonable({"k": (1, 2)}) == {"k": [1, 2]}
    assert P.jsonable(torch.tensor([1, 2])) == [1, 2]
    assert P.jsonable(torch.tensor([0.014967052266001701])) == [0.0149671]
    with pytest.raises(TypeError, match="cannot encode"):
        P.jsonable(object())
    # and the encoder refuses nothing finite after cleaning
    assert "NaN" not in P.script_json({"v": t}) and "Infinity" not in P.script_json({"v": t})


def test_cv_figure_escapes_props_that_circuitsvis_injects_as_html():
    bad = ["<img/src=x/onerror=alert(1)>", "a b"]
    for comp, key in [("ColoredTokens", "tokens"), ("TopkTokens", "tokens"),
                      ("TokenLogProbs", "prompt"), ("TokenLogProbs", "topKTokens")]:
        val = [bad] if comp in ("TopkTokens",) or key == "topKTokens" else bad
        props = _decode_props(P.cv_figure(comp, {key: val, "other": bad}))
        flat = props[key][0] if isinstance(props[key][0], list) else props[key]
        assert flat == ["&lt;img/src=x/onerror=alert(1)&gt;", "a b"], comp
        assert props["other"] == bad  # untouched: not an innerHTML prop
    # canvas-drawn tokens stay raw
    assert _decode_props(P.cv_figure("AttentionHeads", {"tokens": bad}))["tokens"] == bad


def test_cv_figure_validates():
    with pytest.raises(ValueError, match="component must be one of"):
        P.cv_figure("Sankey", {})
    with pytest.raises(TypeError, match="props must be a dict"):
        P.cv_figure("ColoredTokens", [1])
    f = P.cv_figure("ColoredTokens", {"tokens": ["a"], "values": [1.0], "maxValue": None})
    assert _decode_props(f) == {"tokens": ["a"], "values": [1.0]}  # None dropped
    assert f.needs_bundle and not P.html_figure("<p>x</p>").needs_bundle


def _xss_page():
    toks = ["<bos>"] + XSS[:2] + [" cat"]
    ra = torch.randn(2, 4, 4) * 1e-2
    return P.page(
        attention_heads(ra, toks, signed=True, head_names=["L0H0", XSS[0]], title=XSS[1]),
        colored_tokens(toks, [0.1, -0.2, 0.3, float("nan")]),
        heatmap_table(torch.rand(2, 4), ["L0", XSS[1]], toks, hover=[[XSS[0]] * 4] * 2,
                      cell_text=[[XSS[1]] * 4] * 2, title=XSS[0]),
        line_plot({XSS[0]: [1, 2, 3, 4]}, x_labels=toks, y_label=XSS[1], title="rank"),
        title=XSS[0],
    ), toks


def test_saved_page_is_offline_safe(tmp_path):
    pg, _ = _xss_page()
    path = pg.save(tmp_path / "sub" / "p.html")
    assert path.exists() and path.suffix == ".html"
    html = path.read_text(encoding="utf-8")
    low = html.lower()
    assert "<script src" not in low and not re.search(r"<script[^>]*\ssrc\s*=", low)
    assert "<link" not in low and "@import" not in low and "unpkg" not in low
    assert "sourcemappingurl" not in low
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|ws)""", low)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:|//)", low)
    assert "content-security-policy" in low and "default-src 'none'" in low
    # script-src lists exactly the hashes of the page's script blocks (no 'unsafe-inline')
    import base64, hashlib
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    script_src = re.search(r"script-src ([^;]*);", csp).group(1).split()
    blocks = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    want = {"'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in blocks}
    assert set(script_src) == want and len(blocks) == 3  # bundle + 2 mounts
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html


def test_untrusted_tokens_are_escaped_everywhere(tmp_path):
    pg, toks = _xss_page()
    html = pg.to_html()
    # No raw markup from tokens anywhere: neither in HTML nor inside scripts.
    assert "<img" not in html.lower()
    assert "<b>x</b>" not in html
    # Every </script> closes a script we opened: count opening and closing tags (the bundle text
    # itself contains the string "<script>", harmless inside a script, so leave it out).
    rest = html.replace(P.bundle_js(), "")
    assert len(re.findall(r"<script\b", rest, re.I)) == len(re.findall(r"</script", html, re.I)) == 3
    # Own HTML shows the escaped text (tables, SVG, titles).
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in html
    # circuitsvis props decode back to the exact tokens.
    cv = [f for f in pg.figures if f.needs_bundle]
    assert _decode_props(cv[0])["tokens"] == toks
    assert _decode_props(cv[0])["attentionHeadNames"] == ["L0H0", XSS[0]]
    # ColoredTokens puts tokens into innerHTML, so they are HTML-escaped before encoding
    assert _decode_props(cv[1])["tokens"] == [P.escape(t) for t in toks]
    assert "\\u003c/script\\u003e\\u003cb\\u003ex\\u003c/b\\u003e" in html


def test_bundle_once_per_page_and_no_closing_tag_inside():
    toks = ["a", "b", "c"]
    figs = [colored_tokens(toks, [1, 2, 3]) for _ in range(3)]
    html = P.Page(figs, title="three").to_html()
    assert html.count(BUNDLE_MARK) == 1
    bundle = P.bundle_js()
    assert "</script" not in bundle.lower() and "<!--" not in bundle
    assert "window.CircuitsVis = CircuitsVis" in bundle
    # each figure mounts after its own div, with a unique id
    ids = re.findall(r'<div class="tlb-fig" id="([^"]+)"', html)
    assert len(ids) == 3 == len(set(ids))
    for i in ids:
        assert html.index(f'id="{i}-cv"') < html.index(f'var id="{i}-cv"')
    assert html.index(BUNDLE_MARK) < html.index('var id="')
    # the bundle really exports what we mount with
    for comp in ("AttentionHeads", "AttentionPattern", "ColoredTokens", "ColoredTokensMulti",
                 "TopkTokens", "TokenLogProbs", "render"):
        assert re.search(rf"[{{,]{comp}:\(\)=>", bundle), comp


def test_same_figure_twice_gets_distinct_ids_and_html_only_page_has_no_bundle():
    f = colored_tokens(["a"], [1.0])
    html = (f + f).to_html()
    ids = re.findall(r'<div class="tlb-fig" id="([^"]+)"', html)
    assert len(ids) == 2 and ids[0] != ids[1]
    # two renders of one figure differ in ids (notebook outputs can share a document)
    a, b = f._repr_html_(), f._repr_html_()
    assert re.findall(r'id="([^"]+)"', a)[0] != re.findall(r'id="([^"]+)"', b)[0]
    own = P.page(P.html_figure("<p>hi</p>"), title="t").to_html()
    assert BUNDLE_MARK not in own and "<p>hi</p>" in own


def test_composition():
    a, b, c = P.html_figure("<p>a</p>"), P.html_figure("<p>b</p>"), P.html_figure("<p>c</p>")
    pg = a + b
    assert isinstance(pg, P.Page) and pg.figures == (a, b)
    pg2 = (pg + c)
    assert pg2.figures == (a, b, c) and pg2.title == pg.title
    assert P.Page([pg, c], title="x").figures == (a, b, c)
    with pytest.raises(TypeError, match="combine"):
        a + "<p>"
    with pytest.raises(ValueError, match=r"\.html"):
        a.save("/tmp/x.png")


def test_repr_html_is_offline_and_makes_no_network_call(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", boom)
    monkeypatch.setattr(socket.socket, "connect", boom)
    monkeypatch.setattr(urllib.request, "urlopen", boom)
    f = colored_tokens(["<img src=x onerror=alert(1)>", "b"], [1.0, 2.0])
    out = f._repr_html_()
    pg_out = (f + P.html_figure("<p>x</p>"))._repr_html_()
    for o in (out, pg_out):
        assert o.count(BUNDLE_MARK) == 1  # self-contained: Colab renders each output in an iframe
        assert "unpkg" not in o and "<img" not in o.lower()
        assert "<style>" in o


def test_figure_save_standalone(tmp_path):
    f = P.html_figure("<p>x</p>", title="T<1>")
    p = f.save(tmp_path / "f.html")
    html = p.read_text(encoding="utf-8")
    assert "<title>T&lt;1&gt;</title>" in html


def test_lone_surrogate_does_not_crash_save(tmp_path):
    f = P.html_figure(P.escape("bad \ud800 token"))
    p = f.save(tmp_path / "s.html")
    assert "bad ? token" in p.read_text(encoding="utf-8")


def _sha(js):
    import base64, hashlib
    return "'sha256-" + base64.b64encode(hashlib.sha256(js.encode()).digest()).decode() + "'"


def _csp_script_src(html):
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    return set(re.search(r"script-src ([^;]*);", csp).group(1).split())


def test_csp_hashes_only_the_pages_own_scripts_not_scripts_in_content():
    # A <script> that got into a figure's HTML (built by hand, past html_figure's refusal) must not
    # be allow-listed; the bundle, the mounts and the figures' declared scripts must be.
    smuggled = P.Figure(html="<p>x</p><script>alert(1)</script>")
    own = P.html_figure("<p>y</p>", scripts=["document.title='own'"])
    cv = colored_tokens(["a", "<script>alert(2)</script>"], [1.0, 2.0])
    html = P.Page([smuggled, own, cv], title="<script>alert(3)</script>").to_html()
    allowed = _csp_script_src(html)
    blocks = _script_blocks(html)
    assert "alert(1)" in blocks  # the smuggled script is in the page...
    assert _sha("alert(1)") not in allowed  # ...but not allowed to run
    mounts = [b for b in blocks if "CircuitsVis.render(" in b and b != P.bundle_js()]
    assert len(mounts) == 1
    assert allowed == {_sha(P.bundle_js()), _sha("document.title='own'"), _sha(mounts[0])}
    assert allowed == {_sha(b) for b in blocks if b != "alert(1)"}
    assert "alert(3)" not in " ".join(blocks)  # the title is escaped text, not a script


def test_html_figure_keeps_scripts_apart():
    with pytest.raises(TLBackwardError, match="scripts=") as e:
        P.html_figure("<p>x</p><SCRIPT>alert(1)</SCRIPT>")
    assert e.value.argument == "html"
    for bad in ("x='</script>'", "x='<!--'", 3):
        with pytest.raises(TLBackwardError) as e:
            P.html_figure("", scripts=[bad])
        assert e.value.argument == "scripts"
    with pytest.raises(TLBackwardError, match="wrap it in a list"):
        P.html_figure("", scripts="alert(1)")
    f = P.html_figure("<p>x</p>", scripts=["var a=1", "var b=2"])
    assert f.scripts == ("var a=1", "var b=2")
    assert f.fragment("i").endswith("<p>x</p><script>var a=1</script><script>var b=2</script></div>")
