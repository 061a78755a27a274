"""Saved flow graphs in headless Chromium (Debian's ``chromium``): the SVG is complete after the
scripts ran, clicks highlight exactly the paths through a node, kind toggles hide nodes and their
edges, markup in tokens stays text (also in the circuitsvis figure on the same page), and the
page requests nothing from the network."""

import html.parser

import pytest

from tests.browser import dom_after_scripts, network_requests, require_chromium
from tests.flow.conftest import TOKENS
from tests.flow.test_render import XSS, XSS2, poisoned
from tl_backward.flow import flow_graph
from tl_backward.render import page as P
from tl_backward.render.figures import colored_tokens

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TRAP = P.html_figure("", scripts=["window.alert=function(x){"
                     "document.documentElement.setAttribute('data-pwned',String(x))};"])
CLICK = "L1.H0.q"


def _interact(node_id: str) -> P.Figure:
    """Test-only script run after the graph's own: click a node, record the highlighted ids, click
    again (clears), then untick "MLP keys" and count hidden nodes/edges."""
    return P.html_figure("", scripts=[
        "(function(){var d=document.documentElement,svg=document.querySelector('svg.tlb-flow');"
        "function ids(sel){return [].map.call(svg.querySelectorAll(sel),function(x){return x.getAttribute('data-id')});}"
        "var g=svg.querySelector('.n[data-id=" + P.script_json(node_id).replace("<", "") + "]');"
        "g.dispatchEvent(new MouseEvent('click',{bubbles:true}));d.setAttribute('data-on',ids('.n.on').join(' '));"
        "d.setAttribute('data-on-edges',String(svg.querySelectorAll('.e.on').length));"
        "g.dispatchEvent(new MouseEvent('click',{bubbles:true}));d.setAttribute('data-cleared',String(svg.querySelectorAll('.on').length));"
        "var cb=document.querySelector('input[data-kinds=\"mlp_key\"]');cb.checked=false;cb.dispatchEvent(new Event('change'));"
        "d.setAttribute('data-off',svg.querySelectorAll('.n.off').length+' '+svg.querySelectorAll('.e.off').length);"
        "})();"])


class _DOM(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.els, self.text, self._skip = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.els.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.text.append(data)


@pytest.fixture(scope="module")
def saved(gpt2_model, tmp_path_factory):
    require_chromium()
    g = flow_graph(gpt2_model, TOKENS, layer=1)
    bad = poisoned(g)
    d = tmp_path_factory.mktemp("flow-browser")
    cv = colored_tokens([XSS, XSS2, " cat"], [0.1, -0.5, 1.0], title="circuitsvis beside the graph")
    path = P.Page([TRAP, bad.render(), _interact(CLICK), cv], title="flow " + XSS).save(d / "flow.html")
    dom = _DOM()
    dom.feed(dom_after_scripts(path))
    return g, path, dom


def test_svg_complete_after_scripts(saved):
    g, _, dom = saved
    svgs = [a for t, a in dom.els if t == "svg" and "tlb-flow" in a.get("class", "")]
    assert len(svgs) == 1
    assert svgs[0].get("data-ready") == f"{len(g.nodes)} {len(g.edges)}"   # set by the graph's script
    nodes = [a for t, a in dom.els if t == "g" and "n" in a.get("class", "").split()]
    edges = [a for t, a in dom.els if t == "path" and "e" in a.get("class", "").split()]
    assert len(nodes) == len(g.nodes) and len(edges) == len(g.edges)


def test_click_highlights_exactly_the_paths_through_a_node(saved):
    nx = pytest.importorskip("networkx")
    g, _, dom = saved
    root = dict(dom.els[0][1]) if dom.els[0][0] == "html" else next(a for t, a in dom.els if t == "html")
    G = g.to_networkx()
    want = {CLICK} | nx.ancestors(G, CLICK) | nx.descendants(G, CLICK)
    assert set(root["data-on"].split()) == want
    n_edges = sum(1 for e in g.edges if (e.source in nx.ancestors(G, CLICK) | {CLICK} and e.target in
                  nx.ancestors(G, CLICK) | {CLICK}) or (e.source in nx.descendants(G, CLICK) | {CLICK}
                                                        and e.target in nx.descendants(G, CLICK)))
    assert int(root["data-on-edges"]) == n_edges
    assert root["data-cleared"] == "0"
    keys = g.nodes_of("mlp_key")
    hidden_edges = sum(1 for e in g.edges if e.source in {n.id for n in keys} or e.target in {n.id for n in keys})
    assert root["data-off"] == f"{len(keys)} {hidden_edges}"


def test_markup_in_tokens_stays_text(saved):
    _, _, dom = saved
    root = next(a for t, a in dom.els if t == "html")
    assert "data-pwned" not in root
    assert not any(t == "img" for t, _ in dom.els)
    text = "".join(dom.text)
    assert XSS in text and XSS2 in text


def test_no_network_requests(saved, gpt2_model, tmp_path):
    g = flow_graph(gpt2_model, TOKENS, layer=0, backward=True)
    assert network_requests(g.save(tmp_path / "g.html")) == []


# ------------------------------------------------------------------------ size and zoom at 1400 px
WINDOW = (1400, 900)  # the window the report is read in (issue: graphs ~1,780 px wide)

# Test-only script run after the graphs': record each SVG's rendered width at fit, after "100 %",
# after "+", after ctrl + wheel up, and after "fit to width" again; and the page's scroll width.
_MEASURE = P.html_figure("", scripts=[
    "(function(){var d=document.documentElement,out=[];"
    "function w(s){return Math.round(s.getBoundingClientRect().width);}"
    "[].forEach.call(document.querySelectorAll('.tlb-fig'),function(fig){var s=fig.querySelector('svg.tlb-flow');"
    "if(!s)return;function click(a){fig.querySelector('button[data-zoom=\"'+a+'\"]').click();}"
    "var r=[+s.getAttribute('data-w'),w(s)];click('1');r.push(w(s));click('in');r.push(w(s));"
    "s.parentNode.dispatchEvent(new WheelEvent('wheel',{deltaY:-100,ctrlKey:true,bubbles:true,cancelable:true}));"
    "r.push(w(s));click('fit');r.push(w(s));out.push(r.join(' '));});"
    "d.setAttribute('data-widths',out.join(';'));"
    "d.setAttribute('data-view',window.innerWidth+' '+d.scrollWidth);})();"])


def _run_at(path, size):
    from tests.browser import _run

    dom = _run(path, ["--dump-dom", f"--window-size={size[0]},{size[1]}"], wait_ms=5000)
    root = _DOM()
    root.feed(dom)
    return next(a for t, a in root.els if t == "html")


def test_flow_graphs_fit_a_1400px_window_and_zoom_on_demand(gpt2_model, tmp_path):
    one = flow_graph(gpt2_model, TOKENS, layer=1)
    two = flow_graph(gpt2_model, TOKENS, layer=[0, 1])  # two chained layers: ~3,000 px natural
    path = P.Page([one.render(), two.render(), _MEASURE], title="fit").save(tmp_path / "fit.html")
    html = _run_at(path, WINDOW)
    inner, scroll = map(int, html["data-view"].split())
    assert inner == WINDOW[0] and scroll <= inner  # no horizontal scrolling of the page
    rows = [list(map(int, r.split())) for r in html["data-widths"].split(";")]
    assert len(rows) == 2
    for natural, fit, full, bigger, wheeled, refit in rows:
        assert natural > WINDOW[0]  # would not fit unscaled
        assert fit <= inner and fit == refit  # scaled to the figure's width, and back
        assert abs(full - natural) <= 1  # "100 %": the natural size (the box scrolls)
        assert bigger > full and wheeled > bigger  # "+" and ctrl + wheel zoom in


def test_small_graph_is_not_blown_up(gpt2_model, tmp_path):
    g = flow_graph(gpt2_model, TOKENS, layer=1)
    path = P.Page([g.render(), _MEASURE], title="wide").save(tmp_path / "wide.html")
    html = _run_at(path, (3000, 900))  # a window wider than the graph
    natural, fit = map(int, html["data-widths"].split()[:2])
    assert fit == natural
