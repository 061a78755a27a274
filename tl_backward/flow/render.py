"""Draw a VISIT :class:`~tl_backward.flow.graph.FlowGraph` as inline SVG with a few lines of plain JS.

Layout (deterministic, layered, left to right in VISIT order): per layer the columns block_in,
attn_in, qkv, q, keys, values, heads, concat, W_O rows, attn_out, resid_mid, mlp_in, MLP keys,
MLP values, mlp_out, block_out. Skeleton nodes sit on the top lane (skips arc above it); each
head is a band of rows (its memories), neurons are rows in the builder's order (by score). Chained layers share the
block_out/block_in node.

Drawing: stroke width ∝ √(weight / max weight of its unit group) with a minimum; node fill = the
builder's rank colour; hover = SVG ``<title>``; the script adds click-to-highlight of every path
through a node and check boxes to hide node kinds. Size: the SVG scales to the figure's width
(``viewBox``, CSS ``width:100%``, never above its natural size), so a ~1,800 px graph fits a 1,400 px
window; zoom on demand with the buttons or ctrl + wheel over the graph (the box then scrolls).
Offline: no external reference, every token escaped, no inline event handlers (the page CSP
hashes our one script).
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from ..render.page import Figure, escape, html_figure, script_json

# Duck-typed: a graph has .nodes/.edges/.layers/.backward (tl_backward/flow/graph.py); no import of it,
# so the picture never depends on the builder.
FlowGraph = Node = Any

COLUMNS = ("block_in", "attn_in", "qkv", "query", "key", "value", "head", "concat", "wo", "attn_out",
           "resid_mid", "mlp_in", "mlp_key", "mlp_value", "mlp_out", "block_out")
HEADERS = {"block_in": "block in", "attn_in": "attn_in (LN1)", "qkv": "qkv", "query": "q_j", "key": "mem. keys",
           "value": "mem. values", "head": "heads A_j", "concat": "concat", "wo": "W_O rows",
           "attn_out": "attn_out", "resid_mid": "resid_mid", "mlp_in": "mlp_in (LN2)", "mlp_key": "MLP keys",
           "mlp_value": "MLP values", "mlp_out": "mlp_out", "block_out": "block out"}
# Check boxes: (label, node kinds).
TOGGLES = (("qkv", ("qkv",)), ("queries", ("query",)), ("memory keys", ("key",)),
           ("memory values", ("value",)), ("heads", ("head",)), ("W_O rows", ("wo_neuron",)),
           ("biases", ("bias",)), ("MLP keys", ("mlp_key",)), ("MLP values", ("mlp_value",)))
COL_W, NODE_W, NODE_H, ROW_H = 98, 84, 18, 23
TOP, LEFT, LANE = 86, 14, 0  # y of the skeleton lane's top, left margin
DARK_FILLS = {"dimgrey", "darkred", "red", "darkviolet", "blue", "orangered"}
MAX_LABEL = 11

_CSS = """
.tlb-flow-wrap .tlb-flow-ctl{font-size:12px;color:#333;margin:2px 0 6px 0;display:flex;flex-wrap:wrap;gap:4px 12px}
.tlb-flow-wrap .tlb-flow-ctl label{cursor:pointer;white-space:nowrap}
.tlb-flow-wrap .tlb-flow-prompt{font-size:12px;color:#333;margin:2px 0;white-space:pre-wrap}
.tlb-flow-wrap .tlb-flow-prompt span{border:1px solid #ddd;border-radius:3px;padding:0 3px;margin:0 1px;white-space:pre}
.tlb-flow-wrap .tlb-flow-prompt span.at{background:#ffe58a;border-color:#d4b106}
body.tlb-page:has(.tlb-flow-wrap){max-width:none}
.tlb-flow-wrap .tlb-flow-legend .sw{display:inline-block;width:10px;height:10px;border:1px solid #777;
  border-radius:2px;margin:0 3px 0 6px;vertical-align:-1px}
.tlb-flow-wrap .tlb-flow-zoom{font-size:12px;color:#333;margin:2px 0 6px 0}
.tlb-flow-wrap .tlb-flow-zoom button{font-size:12px;padding:0 6px;margin-right:3px;cursor:pointer}
.tlb-flow-wrap .tlb-flow-scroll{overflow:auto;max-height:900px;border-top:1px solid #eee}
svg.tlb-flow{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:#fff;display:block;
  width:100%;height:auto}
svg.tlb-flow .n{cursor:pointer}
svg.tlb-flow .n rect{stroke:#555;stroke-width:.6}
svg.tlb-flow .n text{font-size:11px;pointer-events:none;white-space:pre;fill:#111}
svg.tlb-flow .n text.lt{fill:#fff}
svg.tlb-flow .hdr{font-size:11px;fill:#555;font-weight:600}
svg.tlb-flow .lyr{font-size:13px;fill:#222;font-weight:700}
svg.tlb-flow .e{fill:none;stroke-opacity:.55}
svg.tlb-flow.tlb-focus .n:not(.on){opacity:.15}
svg.tlb-flow.tlb-focus .e:not(.on){stroke-opacity:.04}
svg.tlb-flow.tlb-focus .e.on{stroke-opacity:.9}
svg.tlb-flow .off{display:none}
"""

_JS = """(function(){
var s=document.currentScript,root=s&&s.parentNode&&s.parentNode.querySelector?s.parentNode:document.getElementById(ROOT);
var svg=root.querySelector('svg.tlb-flow');if(!svg)return;
var nodes={},kind={},out={},inn={},edges=[].slice.call(svg.querySelectorAll('.e'));
[].forEach.call(svg.querySelectorAll('.n'),function(g){var i=g.getAttribute('data-id');nodes[i]=g;kind[i]=g.getAttribute('data-kind');});
edges.forEach(function(e){var a=e.getAttribute('data-s'),b=e.getAttribute('data-t');(out[a]=out[a]||[]).push(e);(inn[b]=inn[b]||[]).push(e);});
function walk(id,adj,end,N,E){var st=[id];while(st.length){(adj[st.pop()]||[]).forEach(function(e){E.push(e);var m=e.getAttribute(end);if(!N[m]){N[m]=1;st.push(m);}});}}
function clear(){svg.classList.remove('tlb-focus');[].forEach.call(svg.querySelectorAll('.on'),function(x){x.classList.remove('on');});}
var focus=null;
svg.addEventListener('click',function(ev){var g=ev.target.closest?ev.target.closest('.n'):null;var id=g&&g.getAttribute('data-id');clear();
if(!g||id===focus){focus=null;return;}focus=id;var N={},E=[];N[id]=1;walk(id,out,'data-t',N,E);walk(id,inn,'data-s',N,E);
svg.classList.add('tlb-focus');Object.keys(N).forEach(function(n){if(nodes[n])nodes[n].classList.add('on');});E.forEach(function(e){e.classList.add('on');});});
var hidden={};
[].forEach.call(root.querySelectorAll('input[data-kinds]'),function(cb){cb.addEventListener('change',function(){
cb.getAttribute('data-kinds').split(' ').forEach(function(k){hidden[k]=!cb.checked;});
Object.keys(nodes).forEach(function(i){nodes[i].classList.toggle('off',!!hidden[kind[i]]);});
edges.forEach(function(e){e.classList.toggle('off',!!(hidden[kind[e.getAttribute('data-s')]]||hidden[kind[e.getAttribute('data-t')]]));});});});
var W=+svg.getAttribute('data-w'),z=0,box=svg.parentNode,shown=root.querySelector('.tlb-zoom-level');
function zoom(nz){z=nz;svg.style.width=z?Math.round(W*z)+'px':'100%';svg.style.maxWidth=z?'none':W+'px';
if(shown)shown.textContent=z?Math.round(z*100)+' %':'fit to width';}
function now(){return z||svg.getBoundingClientRect().width/W;}
function step(f){zoom(Math.min(4,Math.max(0.2,now()*f)));}
[].forEach.call(root.querySelectorAll('button[data-zoom]'),function(b){b.addEventListener('click',function(){
var a=b.getAttribute('data-zoom');if(a==='fit')zoom(0);else if(a==='1')zoom(1);else step(a==='in'?1.25:0.8);});});
box.addEventListener('wheel',function(ev){if(!ev.ctrlKey)return;ev.preventDefault();step(ev.deltaY<0?1.1:1/1.1);},{passive:false});
zoom(0);
svg.setAttribute('data-ready',String(Object.keys(nodes).length)+' '+String(edges.length));
})();"""


def _column(n: "Node") -> str:
    if n.kind == "resid":
        return n.name  # block_in / resid_mid / block_out
    if n.kind == "bias":
        return "wo" if n.name == "b_O" else "mlp_value"
    return {"wo_neuron": "wo"}.get(n.kind, n.kind)


def layout(graph: "FlowGraph") -> dict[str, tuple[float, float]]:
    """Top-left (x, y) of every node's box, deterministic: columns in VISIT order, the skeleton on
    the top lane, heads as bands of memory rows, neurons in the builder's order (by score)."""
    base: dict[int, int] = {}
    col = 0
    prev = None
    for l in sorted(graph.layers):
        if prev is not None:
            col += len(COLUMNS) - 1 if l == prev + 1 else len(COLUMNS) + 1
        base[l] = col
        prev = l
    pos: dict[str, tuple[float, float]] = {}
    x_of = lambda l, name: LEFT + (base[l] + COLUMNS.index(name)) * COL_W  # noqa: E731
    by_layer: dict[int, list] = {}
    for n in graph.nodes:
        by_layer.setdefault(n.layer, []).append(n)
    for l, nodes in by_layer.items():
        row_y = lambda r: TOP + LANE + (r + 1) * ROW_H + 8  # noqa: E731
        for n in nodes:
            c = _column(n)
            if c in ("attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "concat"):
                pos[n.id] = (x_of(l, c), TOP)
        # heads: bands ordered by score; memories within a band by score
        # rows follow the builder's order (by score; or another graph's order with like=)
        heads = list(dict.fromkeys(n.head for n in nodes if n.kind == "head"))
        row = 0
        for h in heads:
            mem = [n for n in nodes if n.kind == "key" and n.head == h]
            for c in ("qkv", "query", "head"):
                for n in nodes:
                    if n.kind == c and n.head == h:
                        pos[n.id] = (x_of(l, c), row_y(row))
            for r, k in enumerate(mem):
                pos[k.id] = (x_of(l, "key"), row_y(row + r))
                pos[f"L{l}.H{h}.v{k.position}"] = (x_of(l, "value"), row_y(row + r))
            row += max(1, len(mem))
        for kinds, c in ((("wo_neuron",), "wo"), (("mlp_key",), "mlp_key")):
            neurons = [n for n in nodes if n.kind in kinds]
            for r, n in enumerate(neurons):
                pos[n.id] = (x_of(l, c), row_y(r))
                if c == "mlp_key":
                    pos[f"L{l}.V{n.neuron}"] = (x_of(l, "mlp_value"), row_y(r))
            biases = [n for n in nodes if n.kind == "bias" and _column(n) == ("wo" if c == "wo" else "mlp_value")]
            for r, n in enumerate(biases, start=len(neurons)):
                pos[n.id] = (x_of(l, "wo" if c == "wo" else "mlp_value"), row_y(r))
    # residual nodes shared by chained layers: block_out of L == block_in of L+1 (same id)
    for n in graph.nodes:
        if n.kind == "resid" and n.id.startswith("resid"):
            idx = int(n.id[5:])
            if idx in base:
                pos[n.id] = (x_of(idx, "block_in"), TOP)
            elif idx - 1 in base:
                pos[n.id] = (x_of(idx - 1, "block_out"), TOP)
    missing = [n.id for n in graph.nodes if n.id not in pos]
    if missing:
        raise RuntimeError(f"layout: no position for {missing[:5]}")
    return pos


def _resid_header(graph: "FlowGraph", n: "Node") -> str:
    idx = int(n.id[5:])
    if idx in graph.layers and idx - 1 in graph.layers:
        return f"L{idx - 1} out = L{idx} in"
    return f"block {idx} in" if idx in graph.layers else f"block {idx - 1} out"


def _width(weight: float, max_w: float) -> float:
    return 0.8 + 9.0 * math.sqrt(max(weight, 0.0) / max_w) if max_w > 0 else 0.8


def _label(text: str) -> str:
    shown = repr(text)[1:-1] if any(c in text for c in "\n\r\t") else text
    return shown if len(shown) <= MAX_LABEL else shown[:MAX_LABEL - 1] + "…"


def graph_svg(graph: "FlowGraph", uid: str) -> str:
    """The graph as one ``<svg>`` element (every string escaped)."""
    pos = layout(graph)
    width = max(x for x, _ in pos.values()) + NODE_W + LEFT + 10
    height = max(y for _, y in pos.values()) + NODE_H + 16
    group_max: dict[str, float] = {}
    for e in graph.edges:
        group_max[e.group] = max(group_max.get(e.group, 0.0), e.weight)
    # No width/height attributes: CSS scales it to the figure's width (max-width = natural size,
    # set inline so it holds before the script runs); data-w/-h keep the natural size for zooming.
    parts = [f'<svg class="tlb-flow" data-w="{width:.0f}" data-h="{height:.0f}" style="max-width:{width:.0f}px" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" preserveAspectRatio="xMinYMin meet" role="img">']
    arrow = f"{uid}-arr"
    if graph.backward:
        parts.append(f'<defs><marker id="{arrow}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="5" '
                     f'markerHeight="5" orient="auto-start-reverse" markerUnits="userSpaceOnUse">'
                     f'<path d="M0,0 L10,5 L0,10 z" fill="#444"/></marker></defs>')
    # column headers and layer labels
    seen_cols = set()
    for n in graph.nodes:
        seen_cols.add((pos[n.id][0], _resid_header(graph, n) if n.id.startswith("resid") else _column(n)))
    for l in sorted(graph.layers):
        xs = [pos[n.id][0] for n in graph.nodes if n.layer == l and not n.id.startswith("resid")]
        if xs:
            parts.append(f'<text class="lyr" x="{min(xs):.0f}" y="16">layer {l}</text>')
    for x, c in sorted(seen_cols):
        name = HEADERS.get(c, c)
        parts.append(f'<text class="hdr" x="{x + NODE_W / 2:.0f}" y="{TOP - 44}" text-anchor="middle">{escape(name)}</text>')
    # edges first (under the nodes)
    for e in graph.edges:
        (x1, y1), (x2, y2) = pos[e.source], pos[e.target]
        ax, ay, bx, by = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
        if y1 == TOP and y2 == TOP and bx - ax > COL_W:  # skeleton edge across columns: arc above the lane
            lift = min(40.0, 12 + (bx - ax) / COL_W * 4)
            d = f"M{ax:.1f},{ay:.1f} C{ax + 30:.1f},{ay - lift:.1f} {bx - 30:.1f},{by - lift:.1f} {bx:.1f},{by:.1f}"
        else:
            mx = (ax + bx) / 2
            d = f"M{ax:.1f},{ay:.1f} C{mx:.1f},{ay:.1f} {mx:.1f},{by:.1f} {bx:.1f},{by:.1f}"
        w = 1.2 if e.group == "fixed" else _width(e.weight, group_max[e.group])
        marker = f' marker-start="url(#{arrow})"' if graph.backward else ""
        parts.append(f'<path class="e" data-s="{escape(e.source)}" data-t="{escape(e.target)}" '
                     f'stroke="{escape(e.color)}" stroke-width="{w:.2f}" d="{d}"{marker}>'
                     f'<title>{escape(f"{e.source} → {e.target}: {e.kind}, weight {e.weight:.4g}")}</title></path>')
    for n in graph.nodes:
        x, y = pos[n.id]
        light = ' class="lt"' if n.color in DARK_FILLS else ""
        parts.append(f'<g class="n" data-id="{escape(n.id)}" data-kind="{escape(n.kind)}">'
                     f'<title>{escape(n.title)}</title>'
                     f'<rect x="{x:.0f}" y="{y:.0f}" width="{NODE_W}" height="{NODE_H}" rx="4" fill="{escape(n.color)}"/>'
                     f'<text x="{x + NODE_W / 2:.0f}" y="{y + 13:.0f}" text-anchor="middle"{light}>'
                     f'{escape(_label(n.label))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _prompt(graph: "FlowGraph") -> str:
    toks = [f'<span{" class=at" if i == graph.position else ""} title="position {i}">{escape(t)}</span>'
            for i, t in enumerate(graph.tokens)]
    return "".join(toks)


LEGEND = (("lime", "top 1.4 %"), ("greenyellow", "2.9 %"), ("yellow", "7.1 %"), ("dimgrey", "middle"),
          ("orangered", "bottom 17 %"), ("red", "13 %"), ("darkred", "7.1 %"), ("pink", "bias"),
          ("white", "not projected (the heads' concatenated z is not a d_model vector)"))


def _legend(backward: bool) -> str:
    what = "target rank from the bottom" if backward else "target rank"
    items = "".join(f'<span class="sw" style="background:{c}"></span>{escape(t)} ' for c, t in LEGEND)
    return f'<div class="tlb-note tlb-flow-legend">node colour = {escape(what)}: {items}</div>'


_ZOOM = ('<div class="tlb-flow-zoom">zoom: <button type="button" data-zoom="fit">fit to width</button>'
         '<button type="button" data-zoom="out">−</button><button type="button" data-zoom="1">100 %</button>'
         '<button type="button" data-zoom="in">+</button> <span class="tlb-zoom-level">fit to width</span>'
         ' · or ctrl + wheel over the graph</div>')


def graph_figure(graph: "FlowGraph", *, title: str | None = None) -> Figure:
    """The graph as a :class:`Figure` (sits beside circuitsvis figures on a Page)."""
    uid = "tlb-flow-" + uuid.uuid4().hex[:10]
    direction = "Backward" if graph.backward else "Forward"
    layers = ", ".join(map(str, graph.layers))
    tok = graph.tokens[graph.position]
    title = title or (f"{direction} flow graph · layer{'s' if len(graph.layers) > 1 else ''} {layers} · "
                      f"position {graph.position} ({tok!r}) · target {graph.target_token!r}")
    if graph.backward:
        legend = (f"Nodes: gradients ∂L/∂· at the position (weight nodes: their gradient at this position), "
                  f"labelled by the bottom token of LL(vector) — what a descent step promotes; green = pushes "
                  f"toward the target. Edges: gradient flow (arrows point toward the input). "
                  f"L = {graph.metric:.4g}." if graph.metric is not None else "")
    else:
        legend = ("Nodes: logit-lens top token (bottom token for negative-score neurons); colour = target rank "
                  "(green/yellow: top ~7 %, grey: middle, red: bottom). Edges: contribution (grey = entropy, "
                  "blue/red = sign).")
    notes = "".join(f'<div class="tlb-note">{escape(n)}</div>' for n in graph.notes)
    notes += _legend(graph.backward)
    boxes = "".join(f'<label><input type="checkbox" checked data-kinds="{escape(" ".join(kinds))}"> {escape(lbl)}</label>'
                    for lbl, kinds in TOGGLES)
    html = (f'<div class="tlb-flow-wrap" id="{uid}"><style>{_CSS}</style>'
            f'<div class="tlb-flow-prompt">{_prompt(graph)}</div>'
            f'<div class="tlb-note">{escape(legend)} Click a node to highlight its paths; click again to clear.</div>'
            f"{notes}<div class=\"tlb-flow-ctl\">{boxes}</div>{_ZOOM}"
            f'<div class="tlb-flow-scroll">{graph_svg(graph, uid)}</div></div>')
    return html_figure(html, title=title, scripts=[_JS.replace("ROOT", script_json(uid))])
