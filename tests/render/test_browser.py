"""Saved pages in headless Chromium: circuitsvis components mount, no network, tokens stay text.

Each check has a positive control (a page that *does* fetch / *does* inject markup) so the
detectors are shown to work, not just to stay quiet.
"""

import re

import pytest
import torch

from tests.browser import (dom_after_scripts, network_requests, page_requests_from_netlog,
                           parse_dom, require_chromium)
from tl_backward.render import page as P
from tl_backward.render.figures import (attention_heads, attention_pattern, colored_tokens,
                                        colored_tokens_multi, heatmap_table, line_plot)

pytestmark = pytest.mark.browser

XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_IMG2 = "<img/src='x'/onerror=alert(2)>"  # no spaces: survives circuitsvis's \\s -> &nbsp;
XSS_SCRIPT = "</script><b>x</b>"
TOKENS = ["<bos>", " The", XSS_IMG, XSS_SCRIPT, XSS_IMG2, " cat"]
# Any alert() call (e.g. from an injected onerror handler) marks <html data-pwned>. It is the first
# figure of each page, so the page's CSP hashes it like any of our scripts.
TRAP = P.html_figure("", scripts=["window.alert=function(x){"
                     "document.documentElement.setAttribute('data-pwned',String(x))};"])


@pytest.fixture(scope="module", autouse=True)
def _chromium():
    require_chromium()


def _save_with_trap(pg, path, keep_csp=True):
    path.write_text(P.Page([TRAP, pg], title=pg.title).to_html(csp=keep_csp), encoding="utf-8")
    return path


def _demo_page():
    n = len(TOKENS)
    g = torch.Generator().manual_seed(0)
    ra = torch.randn(3, n, n, generator=g).tril() * 1e-2
    pat = torch.softmax(torch.randn(n, n, generator=g).masked_fill(torch.ones(n, n).triu(1).bool(),
                                                                   float("-inf")), -1)
    figs = [
        attention_heads(ra, TOKENS, signed=True, head_names=["L0H1", XSS_IMG, "L1H2"], title="RA"),
        colored_tokens(TOKENS, torch.linspace(-1, 1, n), title="grad x act"),
        attention_pattern(pat, TOKENS, title="pattern"),
        colored_tokens_multi(TOKENS, torch.rand(n, 2, generator=g), ["L0", XSS_IMG]),
        heatmap_table(torch.rand(2, n, generator=g), ["L0", "L1"], TOKENS, title=XSS_IMG,
                      hover=[[XSS_SCRIPT] * n] * 2),
        line_plot({XSS_IMG: [3, 2, 1]}, x_labels=["L0", "L1", XSS_SCRIPT], title="rank"),
    ]
    return P.Page(figs, title="browser " + XSS_IMG)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("browser")
    pg = _demo_page()
    path = _save_with_trap(pg, d / "demo.html")
    return pg, path, parse_dom(dom_after_scripts(path))


def _fig_ids(tree):
    """ids of the figure divs, without the trap figure."""
    return [i for i, el in tree.by_id.items() if el["attrs"].get("class") == "tlb-fig"][1:]


def test_circuitsvis_components_mount_inside_their_figure(demo):
    _, _, tree = demo
    ids = _fig_ids(tree)
    assert len(ids) == 6
    cv = {i: tree.by_id[i + "-cv"] for i in ids if i + "-cv" in tree.by_id}
    assert len(cv) == 4
    heads, toks, pattern, multi = (cv[i] for i in ids[:4])
    # AttentionHeads: one thumbnail canvas per head + the zoomed canvas
    assert heads["tags"].get("canvas", 0) == 3 + 1
    assert pattern["tags"].get("canvas", 0) == 1
    # ColoredTokens: one inner span per token, each showing the exact token text
    assert toks["tags"].get("span", 0) >= len(TOKENS)
    assert multi["tags"].get("span", 0) >= len(TOKENS)
    for fid in ids:
        text = "".join(tree.by_id[fid]["text"])
        assert "circuitsvis failed" not in text


def test_tokens_show_as_text_not_markup(demo):
    _, _, tree = demo
    assert tree.all_tags.get("img", 0) == 0, "a token was parsed as an <img> element"
    assert tree.all_tags.get("b", 0) == 0, "a token was parsed as a <b> element"
    ids = _fig_ids(tree)
    toks_text = "".join(tree.by_id[ids[1] + "-cv"]["text"]).replace("\xa0", " ")
    for tok in (XSS_IMG, XSS_SCRIPT, XSS_IMG2):
        assert tok in toks_text  # circuitsvis shows the exact token (entities decoded)
    table_text = "".join(tree.by_id[ids[4]]["text"])
    assert XSS_IMG in table_text and XSS_SCRIPT in table_text
    assert XSS_SCRIPT in "".join(tree.by_id[ids[5]]["text"])  # SVG axis label


def _html_tag(dom):
    return re.search(r"<html[^>]*>", dom).group(0)


def test_no_alert_fired_even_without_csp(demo, tmp_path):
    pg, path, _ = demo
    assert "data-pwned" not in _html_tag(dom_after_scripts(path))
    bare = _save_with_trap(pg, tmp_path / "bare.html", keep_csp=False)
    assert "data-pwned" not in _html_tag(dom_after_scripts(bare))


def test_positive_control_raw_circuitsvis_token_is_xss_and_csp_stops_it(tmp_path):
    # circuitsvis puts ColoredTokens tokens into innerHTML: bypassing cv_figure's escaping (by
    # building the Figure by hand) injects a live <img onerror>. Without CSP the trap fires --
    # proving the trap works; with the page's hash-based CSP the injected handler is refused.
    raw = P.Figure(component="ColoredTokens",
                   props_json=P.script_json({"tokens": [XSS_IMG2], "values": [1.0]}))
    bare = dom_after_scripts(_save_with_trap(P.Page([raw]), tmp_path / "ctl.html", keep_csp=False))
    assert 'data-pwned="2"' in _html_tag(bare) and parse_dom(bare).all_tags.get("img", 0) == 1
    with_csp = dom_after_scripts(_save_with_trap(P.Page([raw]), tmp_path / "ctl2.html"))
    assert parse_dom(with_csp).all_tags.get("img", 0) == 1  # markup injected...
    assert "data-pwned" not in _html_tag(with_csp)  # ...but its handler blocked
    # and the trap itself does work under the CSP (so the line above is not vacuous)
    own = P.Page([P.html_figure("", scripts=["alert(3)"]), raw])
    own_dom = dom_after_scripts(_save_with_trap(own, tmp_path / "ctl3.html"))
    assert 'data-pwned="3"' in _html_tag(own_dom)


def test_script_smuggled_into_content_does_not_run_under_csp(tmp_path):
    # A figure whose HTML carries a literal <script> (built by hand, past html_figure's refusal):
    # without the CSP it runs (the control), with it only the page's own scripts run.
    smuggled = P.Figure(html="<p>x</p><script>alert(1)</script>")
    own = P.html_figure("", scripts=["document.documentElement.setAttribute('data-own','1')"])
    pg = P.Page([smuggled, own, colored_tokens(["a"], [1.0])])
    bare = dom_after_scripts(_save_with_trap(pg, tmp_path / "bare.html", keep_csp=False))
    assert 'data-pwned="1"' in _html_tag(bare)
    dom = dom_after_scripts(_save_with_trap(pg, tmp_path / "csp.html"))
    assert "data-pwned" not in _html_tag(dom)
    assert 'data-own="1"' in _html_tag(dom)
    mounts = [el for i, el in parse_dom(dom).by_id.items() if i.endswith("-cv")]
    assert len(mounts) == 1 and mounts[0]["tags"].get("span", 0) >= 1  # circuitsvis still mounts


def test_page_makes_no_network_request(demo, tmp_path):
    pg, path, _ = demo
    assert network_requests(path) == []
    # Without the CSP meta the content itself still requests nothing.
    bare = _save_with_trap(pg, tmp_path / "bare.html", keep_csp=False)
    assert "Content-Security-Policy" not in bare.read_text(encoding="utf-8")
    assert network_requests(bare) == []


def test_network_detector_positive_control(tmp_path):
    page = tmp_path / "fetches.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="http://tlb-probe.invalid/a.png">'
        '<script>fetch("https://tlb-probe.invalid/f").catch(function(){});'
        'try{new WebSocket("wss://tlb-probe.invalid/s")}catch(e){}</script></body></html>',
        encoding="utf-8")
    found = network_requests(page)
    assert "http://tlb-probe.invalid/a.png" in found
    assert "https://tlb-probe.invalid/f" in found
    assert any(u.startswith("wss://tlb-probe.invalid") for u in found)
    # ... and the CSP of our saved pages blocks such fetches outright
    html = P.page(P.html_figure('<img src="http://tlb-probe.invalid/b.png">')).to_html()
    page2 = tmp_path / "csp.html"
    page2.write_text(html, encoding="utf-8")
    assert network_requests(page2) == []


def test_netlog_parser_ignores_browser_internal_requests():
    log = ('{"constants":{"logEventTypes":{"URL_REQUEST_START_JOB":1,"REQUEST_ALIVE":2}},"events":['
           '{"type":1,"source":{"id":5},"params":{"url":"https://update.example/x","initiator":"not an origin"}},'
           '{"type":2,"source":{"id":5},"params":{"url":"https://update.example/x"}},'
           '{"type":1,"source":{"id":6},"params":{"url":"https://page.example/y","initiator":"null"}},'
           '{"type":1,"source":{"id":7},"params":{"url":"file:///tmp/p.html","initiator":"null"}},')
    assert page_requests_from_netlog(log) == ["https://page.example/y"]


def test_notebook_outputs_sharing_one_document_mount_independently(tmp_path):
    # JupyterLab/VS Code put several outputs in one document: each carries its own bundle copy
    # and fresh ids; both must mount (Colab isolates outputs in iframes, which is simpler).
    f = colored_tokens(["a", "b"], [1.0, 2.0])
    doc = ('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
           + f._repr_html_() + f._repr_html_() + "</body></html>")
    path = tmp_path / "nb.html"
    path.write_text(doc, encoding="utf-8")
    tree = parse_dom(dom_after_scripts(path))
    mounts = [el for i, el in tree.by_id.items() if i.endswith("-cv")]
    assert len(mounts) == 2
    for el in mounts:
        assert el["tags"].get("span", 0) >= 2
        assert re.sub(r"\s", "", "".join(el["text"])) == "ab"


def test_screenshot_writes_png_of_requested_size(tmp_path):
    import struct

    from tests.browser import screenshot

    page = P.page(attention_heads(torch.eye(3)[None] * 0.01, ["a", "b", "c"], signed=True)).save(
        tmp_path / "s.html")
    png = screenshot(page, tmp_path / "s.png", size=(640, 480))
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (640, 480)
