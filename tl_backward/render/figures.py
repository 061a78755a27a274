"""Generic figures every feature reuses (no model code; inputs are tensors/arrays/lists + strings).

circuitsvis-backed: :func:`attention_heads`, :func:`attention_pattern`, :func:`colored_tokens`,
:func:`colored_tokens_multi`. Project-owned (plain HTML/SVG, zero dependencies):
:func:`heatmap_table`, :func:`line_plot`. All return a :class:`~tl_backward.render.page.Figure`;
every token/label string is escaped (HTML) or script-JSON encoded (circuitsvis props).

Colour convention for signed maps (Reversed Attention, gradients): a symmetric range +-m with
m = max|value| so 0 is white, negative red, positive blue -- circuitsvis's defaults, and
``heatmap_table(colour="diverging")`` uses the same.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import TLBackwardError
from .page import Figure, cv_figure, escape, html_figure, jsonable

__all__ = ["attention_heads", "attention_pattern", "colored_tokens", "colored_tokens_multi",
           "heatmap_table", "line_plot"]


# ------------------------------------------------------------------------------------------ helpers
def _array(values: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """float64 array with NaN/inf/sentinels already zeroed (via jsonable)."""
    try:
        a = np.asarray(jsonable(values), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TLBackwardError(f"{name} must be numeric (tensor, array or nested list): {e}", argument=name) from None
    if ndim is not None and a.ndim != ndim:
        raise TLBackwardError(f"{name} must have {ndim} dimensions, got shape {tuple(a.shape)}", argument=name)
    return a


def _strings(items: Any, name: str) -> list[str]:
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise TLBackwardError(f"{name} must be a list of strings, got {type(items).__name__}", argument=name)
    return [str(t) for t in items]


def _max_abs(a: np.ndarray, max_abs: float | None) -> float:
    if max_abs is not None:
        m = float(max_abs)
    else:
        m = float(np.abs(a).max()) if a.size else 0.0
    return m if m > 0 else 1.0  # all-zero map: any positive range shows it white


# ------------------------------------------------------------------------------- circuitsvis figures
def attention_heads(maps: Any, tokens: Sequence[str], *, head_names: Sequence[str] | None = None,
                    signed: bool = False, mask_upper_tri: bool = True, max_abs: float | None = None,
                    title: str | None = None, positive_color: str | None = None,
                    negative_color: str | None = None) -> Figure:
    """Several attention-like maps ``Float[heads, query_pos, key_pos]`` over ``tokens`` (circuitsvis
    AttentionHeads: a thumbnail per head, click to enlarge).

    ``signed=True`` (Reversed Attention, ~1e-2 values): colour range +-m, m = ``max_abs`` or
    max|maps| over all heads shown, so 0 is white, negative red, positive blue. ``signed=False``
    (attention patterns): range 0..1 (or 0..``max_abs``). ``mask_upper_tri`` greys the future
    triangle (causal maps); pass False for MAS masks / bidirectional maps. ``positive_color`` /
    ``negative_color``: any CSS colour (defaults blue / red).
    """
    a = _array(maps, "maps", 3)
    toks = _strings(tokens, "tokens")
    if a.shape[1] != a.shape[2] or a.shape[1] != len(toks):
        raise TLBackwardError(f"maps must be [heads, {len(toks)}, {len(toks)}] for {len(toks)} tokens, "
                         f"got {tuple(a.shape)}", argument="maps")
    names = None
    if head_names is not None:
        names = _strings(head_names, "head_names")
        if len(names) != a.shape[0]:
            raise TLBackwardError(f"head_names has {len(names)} names for {a.shape[0]} heads", argument="head_names")
    if signed:
        m = _max_abs(a, max_abs)
        lo, hi = -m, m
    else:
        lo, hi = 0.0, (float(max_abs) if max_abs else 1.0)
    props = {"attention": a, "tokens": toks, "attentionHeadNames": names, "maxValue": hi,
             "minValue": lo, "maskUpperTri": bool(mask_upper_tri),
             "positiveColor": positive_color, "negativeColor": negative_color}
    return cv_figure("AttentionHeads", props, title=title)


def attention_pattern(map: Any, tokens: Sequence[str], *, signed: bool = False,
                      mask_upper_tri: bool = True, max_abs: float | None = None,
                      show_axis_labels: bool = True, title: str | None = None,
                      positive_color: str | None = None, negative_color: str | None = None) -> Figure:
    """One map ``Float[query_pos, key_pos]`` (circuitsvis AttentionPattern), e.g. a MAS mask with
    ``mask_upper_tri=False``. Colour range as in :func:`attention_heads`."""
    a = _array(map, "map", 2)
    toks = _strings(tokens, "tokens")
    if a.shape != (len(toks), len(toks)):
        raise TLBackwardError(f"map must be [{len(toks)}, {len(toks)}] for {len(toks)} tokens, "
                         f"got {tuple(a.shape)}", argument="map")
    if signed:
        m = _max_abs(a, max_abs)
        lo, hi = -m, m
    else:
        lo, hi = 0.0, (float(max_abs) if max_abs else 1.0)
    props = {"attention": a, "tokens": toks, "maxValue": hi, "minValue": lo,
             "maskUpperTri": bool(mask_upper_tri), "showAxisLabels": bool(show_axis_labels),
             "positiveColor": positive_color, "negativeColor": negative_color}
    return cv_figure("AttentionPattern", props, title=title)


def colored_tokens(tokens: Sequence[str], values: Any, *, signed: bool | None = None,
                   max_abs: float | None = None, title: str | None = None,
                   positive_color: str | None = None, negative_color: str | None = None) -> Figure:
    """Tokens with background colour by ``values`` ``Float[pos]`` (circuitsvis ColoredTokens;
    hover shows the value). ``signed`` (default: any value < 0) uses +-m, else 0..m,
    with m = ``max_abs`` or max|values|."""
    toks = _strings(tokens, "tokens")
    v = _array(values, "values", 1)
    if len(v) != len(toks):
        raise TLBackwardError(f"values has {len(v)} entries for {len(toks)} tokens", argument="values")
    if signed is None:
        signed = bool((v < 0).any())
    m = _max_abs(v, max_abs)
    props = {"tokens": toks, "values": v, "maxValue": m, "minValue": -m if signed else 0.0,
             "positiveColor": positive_color, "negativeColor": negative_color}
    return cv_figure("ColoredTokens", props, title=title)


def colored_tokens_multi(tokens: Sequence[str], values: Any, labels: Sequence[str] | None = None,
                         *, title: str | None = None) -> Figure:
    """Tokens coloured by one of K series ``Float[pos, K]`` chosen interactively (circuitsvis
    ColoredTokensMulti), e.g. per-layer gradient norms with ``labels=["L0", "L1", ...]``."""
    toks = _strings(tokens, "tokens")
    v = _array(values, "values", 2)
    if v.shape[0] != len(toks):
        raise TLBackwardError(f"values must be [{len(toks)} tokens, K], got {tuple(v.shape)}", argument="values")
    labs = None
    if labels is not None:
        labs = _strings(labels, "labels")
        if len(labs) != v.shape[1]:
            raise TLBackwardError(f"labels has {len(labs)} names for {v.shape[1]} series", argument="labels")
    return cv_figure("ColoredTokensMulti", {"tokens": toks, "values": v, "labels": labs}, title=title)


# ------------------------------------------------------------------------------ project-owned HTML
_PALETTE = {  # end colour of sequential scales (white -> colour)
    "purple": (106, 61, 154), "green": (35, 139, 69), "blue": (33, 102, 172),
}
_NEG, _POS = (214, 39, 40), (31, 90, 200)  # diverging ends: red (negative), blue (positive)


def _mix(rgb: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    t = min(max(t, 0.0), 1.0)
    return tuple(round(255 + (c - 255) * t) for c in rgb)  # type: ignore[return-value]


def _cell_colours(v: float, lo: float, hi: float, colour: str) -> tuple[str, str]:
    """(background, text colour) for a value; text turns white on dark cells."""
    if colour == "diverging":
        m = max(abs(lo), abs(hi)) or 1.0
        t = abs(v) / m
        rgb = _mix(_POS if v >= 0 else _NEG, t)
    else:
        t = (v - lo) / (hi - lo) if hi > lo else 0.0
        rgb = _mix(_PALETTE[colour], t)
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})", ("#fff" if lum < 140 else "#111")


def heatmap_table(values: Any, row_labels: Sequence[str], col_labels: Sequence[str], *,
                  title: str | None = None, colour: str = "purple",
                  fmt: str | Callable[[float], str] = ".3g",
                  cell_text: Sequence[Sequence[str]] | None = None,
                  hover: Sequence[Sequence[str]] | None = None,
                  vmin: float | None = None, vmax: float | None = None,
                  corner: str = "", caption: str | None = None) -> Figure:
    """An HTML table of ``values`` ``Float[rows, cols]`` with cell background by value.

    ``colour``: "purple" | "green" | "blue" (white -> colour over [vmin, vmax], default data range)
    or "diverging" (symmetric +-max|value|; negative red, 0 white, positive blue).
    Cell text is ``format(value, fmt)`` (``fmt`` a format spec or callable) unless ``cell_text``
    [rows][cols] strings are given (e.g. Backward Lens ``"top1 \\ bottom1"``); ``hover`` [rows][cols]
    strings become native tooltips (newlines allowed). Non-finite values show as empty grey cells.
    Every label/text/tooltip is HTML-escaped here; callers pass raw strings.
    """
    if colour not in (*_PALETTE, "diverging"):
        raise TLBackwardError(f"colour must be one of {[*_PALETTE, 'diverging']}, got {colour!r}", argument="colour")
    raw = np.asarray(values.detach().cpu().double() if hasattr(values, "detach") else values,
                     dtype=np.float64)
    if raw.ndim != 2:
        raise TLBackwardError(f"values must be [rows, cols], got shape {tuple(raw.shape)}", argument="values")
    rows, cols = _strings(row_labels, "row_labels"), _strings(col_labels, "col_labels")
    if raw.shape != (len(rows), len(cols)):
        raise TLBackwardError(f"values shape {tuple(raw.shape)} does not match {len(rows)} row_labels x "
                         f"{len(cols)} col_labels", argument="values")
    for grid, name in ((cell_text, "cell_text"), (hover, "hover")):
        if grid is not None and (len(grid) != len(rows) or any(len(r) != len(cols) for r in grid)):
            raise TLBackwardError(f"{name} must be a [{len(rows)}][{len(cols)}] grid of strings")
    finite = raw[np.isfinite(raw)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if colour != "diverging" and vmin is None:
        lo = min(lo, 0.0)  # norms: start the scale at 0 so colour is proportional to value
    fmt_fn = fmt if callable(fmt) else (lambda x: format(x, fmt))

    out = ['<table class="tlb-table">']
    if caption:
        out.append(f"<caption>{escape(caption)}</caption>")
    out.append(f'<thead><tr><th class="tlb-rowhead">{escape(corner)}</th>')
    out.extend(f"<th>{escape(c)}</th>" for c in cols)
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(rows):
        out.append(f'<tr><th class="tlb-rowhead">{escape(r)}</th>')
        for j in range(len(cols)):
            v = float(raw[i, j])
            tip = f' title="{escape(hover[i][j])}"' if hover is not None else ""
            if not math.isfinite(v):
                out.append(f'<td style="background:#eee"{tip}></td>')
                continue
            bg, fg = _cell_colours(v, lo, hi, colour)
            text = cell_text[i][j] if cell_text is not None else fmt_fn(v)
            out.append(f'<td style="background:{bg};color:{fg}" data-value="{v:.6g}"{tip}>'
                       f"{escape(text)}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return html_figure("".join(out), title=title)


_SERIES_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
                   "#17becf", "#7f7f7f", "#bcbd22")


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.ceil(lo / step - 1e-9) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def line_plot(series: Mapping[str, Sequence[float]], *, x_labels: Sequence[str],
              title: str | None = None, y_label: str = "", x_label: str = "",
              y_range: tuple[float, float] | None = None, invert_y: bool = False,
              log_y: bool = False, width: int = 560, height: int = 300, note: str | None = None) -> Figure:
    """A small inline-SVG line chart (no dependencies): one line per ``series`` name, points at
    ``x_labels`` (e.g. target rank vs layer). Non-finite points (and non-positive ones with
    ``log_y``) leave gaps. ``invert_y`` puts small values on top (ranks: 0 = best); ``log_y`` uses a
    log10 axis (ranks span 1..vocab). Hovering a point shows ``series, x: value``. ``note``: a line
    of text under the chart (e.g. what a gap means)."""
    xs = _strings(x_labels, "x_labels")
    if not isinstance(series, Mapping) or not series:
        raise TLBackwardError("series must be a non-empty dict {name: list of floats}", argument="series")
    raw, data = {}, {}
    for name, ys in series.items():
        arr = np.asarray(ys.detach().cpu().double() if hasattr(ys, "detach") else ys, dtype=np.float64)
        if arr.shape != (len(xs),):
            raise TLBackwardError(f"series {name!r} has shape {tuple(arr.shape)}, expected ({len(xs)},)",
                                  argument="series")
        raw[str(name)] = arr
        with np.errstate(divide="ignore", invalid="ignore"):
            data[str(name)] = np.where(arr > 0, np.log10(np.where(arr > 0, arr, 1.0)), np.nan) if log_y else arr
    allv = np.concatenate(list(data.values()))
    allv = allv[np.isfinite(allv)]
    if y_range is not None:
        if log_y and min(y_range) <= 0:
            raise TLBackwardError(f"y_range must be positive with log_y, got {y_range}", argument="y_range")
        lo, hi = (math.log10(y_range[0]), math.log10(y_range[1])) if log_y else map(float, y_range)
    else:
        lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    ml, mr, mt, mb = 56, 16, 14, 40
    pw, ph = width - ml - mr, height - mt - mb
    legend_w = 30 + 7 * min(24, max(len(n) for n in data))

    def px(i: int) -> float:
        return ml + (pw * i / (len(xs) - 1) if len(xs) > 1 else pw / 2)

    def py(v: float) -> float:
        t = (min(max(v, lo), hi) - lo) / (hi - lo)
        return mt + (t if invert_y else 1 - t) * ph

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + legend_w}" height="{height}" '
           f'viewBox="0 0 {width + legend_w} {height}" role="img">',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    ticks = ([float(k) for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)] or [lo, hi]
             if log_y else _nice_ticks(lo, hi))
    for t in ticks:
        y = py(t)
        label = f"{10 ** t:g}" if log_y else f"{t:g}"
        svg.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{label}</text>')
    every = max(1, math.ceil(len(xs) / 16))
    for i, lab in enumerate(xs):
        if i % every == 0:
            svg.append(f'<text x="{px(i):.1f}" y="{mt + ph + 16}" font-size="11" '
                       f'text-anchor="middle">{escape(lab)}</text>')
    if y_label:
        svg.append(f'<text x="14" y="{mt + ph / 2:.1f}" font-size="12" text-anchor="middle" '
                   f'transform="rotate(-90 14 {mt + ph / 2:.1f})">{escape(y_label)}</text>')
    if x_label:
        svg.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" font-size="12" '
                   f'text-anchor="middle">{escape(x_label)}</text>')
    for k, (name, ys) in enumerate(data.items()):
        c = _SERIES_COLOURS[k % len(_SERIES_COLOURS)]
        segs, cur = [], []
        for i, v in enumerate(ys):
            if math.isfinite(v):
                cur.append(f"{px(i):.1f},{py(v):.1f}")
            elif cur:
                segs.append(cur)
                cur = []
        if cur:
            segs.append(cur)
        for seg in segs:
            svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{" ".join(seg)}"/>')
        for i, v in enumerate(ys):
            if math.isfinite(v):
                svg.append(f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3" fill="{c}"><title>'
                           f'{escape(f"{name}, {xs[i]}: {raw[name][i]:.4g}")}</title></circle>')
        ly = mt + 8 + 16 * k
        svg.append(f'<line x1="{width + 4}" x2="{width + 18}" y1="{ly}" y2="{ly}" stroke="{c}" '
                   f'stroke-width="2"/><text x="{width + 22}" y="{ly + 4}" font-size="11">'
                   f"{escape(name)}</text>")
    svg.append("</svg>")
    if note:
        svg.append(f'<div class="tlb-note">{escape(note)}</div>')
    return html_figure("".join(svg), title=title)
