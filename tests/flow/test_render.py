"""Flow-graph HTML without a browser: one SVG element per node/edge, escaping, layout, size."""

import dataclasses
import html.parser
import re

import pytest

from tests.flow.conftest import TOKENS
from tl_backward.flow import flow_graph
from tl_backward.flow.render import COL_W, layout
from tl_backward.render.page import Figure, Page

XSS = "<img src=x onerror=alert(1)>"
XSS2 = "</script><script>alert(2)</script>"


class Elements(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.items, self.text = [], []
        self._in_title = 0

    def handle_starttag(self, tag, attrs):
        self.items.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def elements(text):
    p = Elements()
    p.feed(text)
    return p


def poisoned(g):
    """The same graph with every token-derived string replaced by markup."""
    nodes = tuple(dataclasses.replace(n, label=XSS if i % 2 else XSS2, title=f"{XSS}\n{XSS2}")
                  for i, n in enumerate(g.nodes))
    return dataclasses.replace(g, nodes=nodes, tokens=tuple(XSS for _ in g.tokens), target_token=XSS2)


@pytest.fixture(scope="module")
def graph(gpt2_model):
    return flow_graph(gpt2_model, TOKENS, layer=1)


def test_one_svg_element_per_node_and_edge(graph):
    fig = graph.render()
    assert isinstance(fig, Figure)
    els = elements(fig.html)
    nodes = [a for t, a in els.items if t == "g" and a.get("class") == "n"]
    edges = [a for t, a in els.items if t == "path" and a.get("class") == "e"]
    assert len(nodes) == len(graph.nodes) and len(edges) == len(graph.edges)
    assert {a["data-id"] for a in nodes} == {n.id for n in graph.nodes}
    assert {(a["data-s"], a["data-t"]) for a in edges} == {(e.source, e.target) for e in graph.edges}
    assert sum(t == "script" for t, _ in els.items) == 0 and len(fig.scripts) == 1  # script kept apart (CSP)
    assert not re.search(r"\bon[a-z]+\s*=", fig.html)          # no inline handlers (CSP)
    assert "<svg" in graph._repr_html_() and graph._repr_html_().count("<script") >= 1


def test_tokens_are_escaped(graph, tmp_path):
    bad = poisoned(graph)
    fig = bad.render()
    els = elements(fig.html)
    assert not any(t == "img" for t, _ in els.items)
    assert sum(t == "script" for t, _ in els.items) == 0         # our own script is kept apart
    text = "".join(els.text)
    assert XSS in text and XSS2 in text                         # shown as text
    path = bad.save(tmp_path / "bad.html")
    saved = elements(path.read_text(encoding="utf-8"))
    assert not any(t == "img" for t, _ in saved.items)


def test_layout_is_deterministic_layered_and_in_visit_order(graph, neox_model):
    pos = layout(graph)
    assert pos == layout(graph)
    x = lambda kind: {pos[n.id][0] for n in graph.nodes if n.kind == kind}  # noqa: E731
    order = ["attn_in", "qkv", "query", "key", "value", "head", "concat", "wo_neuron", "attn_out", "mlp_in",
             "mlp_key", "mlp_value", "mlp_out"]
    cols = [x(k) for k in order]
    assert all(len(c) == 1 for c in cols)
    xs = [c.pop() for c in cols]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    assert pos["resid1"][0] < xs[0] and pos["resid2"][0] > xs[-1]
    # boxes never overlap
    boxes = sorted(pos.values())
    assert len(set(boxes)) == len(boxes)
    # neurons sorted by score within their column
    wo = sorted(graph.nodes_of("wo_neuron"), key=lambda n: pos[n.id][1])
    assert [n.value for n in wo] == sorted((n.value for n in wo), reverse=True)
    # chained: the next layer starts where this one ends
    chain = flow_graph(neox_model, TOKENS, layer=[0, 1])
    cp = layout(chain)
    assert cp["L1.attn_in"][0] - cp["L0.attn_in"][0] == 15 * COL_W


def test_page_beside_circuitsvis_and_size(graph, tmp_path):
    from tl_backward.render.figures import attention_heads
    import torch

    fig = attention_heads(torch.rand(2, 4, 4), ["a", "b", "c", "d"], title="heads")
    pg = graph.render() + fig
    assert isinstance(pg, Page) and pg.needs_bundle
    out = pg.save(tmp_path / "both.html")
    assert out.stat().st_size > 1e6                      # the circuitsvis bundle is inlined once
    alone = graph.save(tmp_path / "graph.html")
    assert alone.stat().st_size < 500_000
    assert "CircuitsVis" not in alone.read_text(encoding="utf-8")
