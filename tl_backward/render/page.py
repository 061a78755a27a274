"""Offline-safe HTML pages built from circuitsvis components and project-owned HTML/SVG.

Pure HTML plumbing: no model code, no network. Everything a result's ``render()`` returns is a
:class:`Figure` (one fragment) or a :class:`Page` (several), and both offer the same interface:

* ``_repr_html_()`` -- what Jupyter/Colab/VS Code display. Offline: the circuitsvis bundle is
  inlined (never the CDN form) and there is no connectivity probe. In a notebook the bundle is sent
  once per kernel session and later outputs reuse it (Colab: in every output), see
  :func:`notebook_bundle`.
* ``to_html()`` -- a full standalone UTF-8 page; ``save(path)`` writes it and returns the ``Path``.
* ``a + b`` / ``page(a, b, title=...)`` -- combine; a page holds the 1.3 MB bundle exactly once.

Why not circuitsvis's own ``RenderedHTML``: its ``_repr_html_`` probes google.com on every display and
then emits the CDN (unpkg) form, its props are raw ``json.dumps`` inside ``<script>`` (a token
``</script>`` breaks out), and each fragment carries its own copy of the bundle. Here the props are
encoded with :func:`script_json` and the bundle goes in one classic ``<script>`` that defines
``window.CircuitsVis``; each figure is ``<div class="tlb-fig" id=...>`` followed by a small mount
script calling ``CircuitsVis.render(mountId, CircuitsVis[component], props)`` -- the same call
circuitsvis's ``render_local`` makes (the bundle's ``render`` does ``document.querySelector('#'+id)``
then ``ReactDOM.createRoot(el).render(...)``).

Element ids are assigned when HTML is produced (random per call), so the same Figure can appear
twice on a page or in two notebook outputs sharing one document without id clashes.

Untrusted strings (tokens, prompts): circuitsvis draws some on canvas but injects others with
``innerHTML`` (ColoredTokens, TokenLogProbs, TopkTokens, ...) -- a live XSS with circuitsvis's own
wrappers. :func:`cv_figure` HTML-escapes exactly those props (:data:`HTML_STRING_PROPS`), so pass raw
strings to it. Saved pages also carry a CSP that allows no fetch and only our own (hashed) scripts.

Writing a paper's pictures (``<paper>/render.py``, e.g. ``attention/render.py``)::

    from tl_backward.render.page import Figure, Page, cv_figure, html_figure, escape
    from tl_backward.render.figures import attention_heads, heatmap_table, line_plot

    def render_result(res) -> Page:
        return Page([attention_heads(res.maps, res.tokens, signed=True, head_names=names),
                     heatmap_table(res.norms, rows, cols, title="...")], title="...")

Own HTML goes through :func:`html_figure` with every untrusted string passed through
:func:`escape`; no external URLs, no ``<script>`` in the HTML and no inline event handlers
(``onclick=``): pass JavaScript as ``html_figure(html, scripts=[source])``. The CSP allows exactly
the scripts this module emits (bundle, mounts, figures' ``scripts``), hashed from their sources --
never by reading the finished page -- so markup smuggled into content cannot run.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Union

from ..errors import TLBackwardError
from .escaping import escape, jsonable, script_json
from .notebook import notebook_bundle, send_bundle_now

__all__ = [
    "escape",
    "script_json",
    "jsonable",
    "Figure",
    "Page",
    "page",
    "cv_figure",
    "html_figure",
    "bundle_js",
    "notebook_bundle",
    "CV_COMPONENTS",
    "HTML_STRING_PROPS",
    "CSS",
]

# Components exported by circuitsvis 1.43.3's dist/cdn/iife.js (checked against the bundle's export map).
CV_COMPONENTS = frozenset({
    "AttentionHeads", "AttentionPattern", "AttentionPatterns", "ColoredTokens", "ColoredTokensMulti",
    "Hello", "TextNeuronActivations", "TokenLogProbs", "TopkSamples", "TopkTokens",
})

# Props whose strings these components insert with React's dangerouslySetInnerHTML (checked in
# iife.js: ColoredTokens/ColoredTokensMulti/TextNeuronActivations/TopkSamples/TokenLogProbs/TopkTokens
# replace whitespace with "&nbsp;" and set innerHTML; the deprecated AttentionPatterns likewise).
# A token "<img/src='x'/onerror=...>" runs there (verified in headless Chromium), so cv_figure HTML-escapes these strings first;
# innerHTML decodes the entities, so the token shows as its exact text. (Side effect: a few hover
# tooltips that print the same prop as plain React text show the escaped form, e.g. "&lt;".)
# AttentionHeads/AttentionPattern draw tokens on a canvas (chart.js) and need the raw strings.
HTML_STRING_PROPS = {
    "ColoredTokens": ("tokens",), "ColoredTokensMulti": ("tokens",),
    "TextNeuronActivations": ("tokens",), "TopkSamples": ("tokens",), "TopkTokens": ("tokens",),
    "TokenLogProbs": ("prompt", "topKTokens"), "AttentionPatterns": ("tokens",),
}

# -------------------------------------------------------------------------------------- bundle + css
@lru_cache(maxsize=1)
def bundle_js() -> str:
    """The circuitsvis browser bundle (``dist/cdn/iife.js``) made safe to inline in a classic script.

    ``</script`` (once, inside a string literal in React) becomes ``<\\/script`` -- the same string to
    JavaScript, invisible to the HTML parser (circuitsvis deletes it instead). ``<!--`` is escaped the
    same way for the same reason, and the trailing ``sourceMappingURL`` comment is dropped.
    """
    import circuitsvis  # local import: only pages with circuitsvis figures need it

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    js = path.read_text(encoding="utf-8")
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    js = js.replace("<!--", "<\\!--")
    js = re.sub(r"^//# sourceMappingURL=.*$", "", js, flags=re.MULTILINE)
    # The bundle is `"use strict";var CircuitsVis=(()=>{...})();` -- in a classic script that var is
    # already global; assign it explicitly so the intent survives any wrapping by notebook frontends.
    # Then mount the figures of earlier-rendered notebook outputs that waited for it (see _mount_js).
    return (js + "\n;window.CircuitsVis = CircuitsVis;\n"
            "(window.tlbPending || []).splice(0).forEach(function (go) { go(); });\n")


CSS = """
.tlb-fig{background:#fff;color:#1a1a1a;border:1px solid #d0d0d0;border-radius:6px;padding:10px 12px;
  margin:12px 0;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;overflow-x:auto;
  color-scheme:light;max-width:100%;box-sizing:border-box}
.tlb-fig .tlb-title{font-weight:600;font-size:14px;margin:0 0 8px 0}
.tlb-fig .tlb-note{color:#555;font-size:12px;margin:4px 0}
.tlb-fig .tlb-error{color:#b00020;font-family:monospace;white-space:pre-wrap}
.tlb-fig table.tlb-table{border-collapse:collapse;font-size:12px}
.tlb-fig table.tlb-table th,.tlb-fig table.tlb-table td{border:1px solid #e2e2e2;padding:2px 6px;
  text-align:center;white-space:nowrap}
.tlb-fig table.tlb-table th{background:#f4f4f4;font-weight:600;position:sticky;top:0}
.tlb-fig table.tlb-table th.tlb-rowhead{text-align:right;position:static}
.tlb-fig table.tlb-table td{font-family:ui-monospace,Menlo,Consolas,monospace;color:#111}
.tlb-fig svg text{font-family:system-ui,sans-serif;fill:#222}
body.tlb-page{margin:20px auto;max-width:1200px;padding:0 16px;background:#fafafa;color:#1a1a1a;
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
body.tlb-page h1{font-size:20px}
"""

# Saved pages carry a Content-Security-Policy (defence in depth; the content is safe without it):
# no fetch of any kind (default-src 'none'), and only OUR inline scripts run -- each script is
# allowed by its sha256 hash. The hashes come from the scripts this module generates (the bundle,
# the mounts, each figure's ``scripts``), listed before any figure HTML is placed; the page is never
# scanned for <script> blocks, so markup that slipped into content (<script>, <img onerror=...>)
# cannot run even if some string escaped escaping. Consequence for html_figure content: no inline
# event-handler attributes (onclick=...); pass listeners as ``scripts=`` instead.
CSP_TEMPLATE = ("default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
                "img-src data:; font-src data:")


def _csp_meta(scripts: Iterable[str]) -> str:
    """CSP <meta> allowing exactly the script sources ``scripts`` (our own, not read from HTML)."""
    hashes = sorted({_sha256(js) for js in scripts})
    policy = CSP_TEMPLATE.format(hashes=" ".join(f"'{h}'" for h in hashes) or "'none'")
    return f'<meta http-equiv="Content-Security-Policy" content="{policy}">'


@lru_cache(maxsize=64)
def _sha256(text: str) -> str:
    import base64
    import hashlib

    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


# -------------------------------------------------------------------------------------------- figures
@dataclass(frozen=True, repr=False)
class Figure:
    """One immutable figure: project HTML and/or one circuitsvis component mount.

    ``html`` is trusted, already-escaped inner HTML without scripts; ``component``/``props_json`` (a
    :func:`script_json` string) describe a circuitsvis mount, rendered below ``html``; ``scripts``
    are the figure's own JavaScript sources, placed after it in ``<script>`` blocks (only these, the
    mounts and the bundle are allow-listed by a saved page's CSP). ``needs_bundle`` is true iff a
    circuitsvis component is mounted.
    """

    html: str = ""
    title: str | None = None
    component: str | None = None
    props_json: str | None = None
    height: str | None = None
    scripts: tuple[str, ...] = ()

    @property
    def needs_bundle(self) -> bool:
        return self.component is not None

    @property
    def figures(self) -> tuple["Figure", ...]:
        return (self,)

    def fragment(self, fig_id: str) -> str:
        """This figure's HTML (no bundle), with element ids derived from ``fig_id``."""
        return self._assemble(fig_id)[0]

    def _assemble(self, fig_id: str) -> tuple[str, list[str]]:
        """(HTML, the script sources it contains): the scripts are generated here, from our own
        code, never found by reading ``html`` -- so only they can be allow-listed."""
        scripts: list[str] = []
        parts = [f'<div class="tlb-fig" id="{escape(fig_id)}">']
        if self.title:
            parts.append(f'<div class="tlb-title">{escape(self.title)}</div>')
        if self.html:
            parts.append(self.html)
        if self.component is not None:
            mount_id = fig_id + "-cv"
            style = f' style="height:{escape(self.height)};overflow:auto"' if self.height else ""
            parts.append(f'<div class="tlb-cv" id="{escape(mount_id)}"{style}></div>')
            scripts.append(_mount_js(mount_id, self.component, self.props_json or "{}"))
        scripts.extend(self.scripts)
        parts.extend(f"<script>{js}</script>" for js in scripts)
        parts.append("</div>")
        return "".join(parts), scripts

    # shared interface ---------------------------------------------------------------------------
    def __add__(self, other: "Figure | Page") -> "Page":
        return Page(self.figures + _figures_of(other))

    def __repr__(self) -> str:  # concise: props can be megabytes
        kind = self.component or "html"
        size = len(self.props_json or "") + len(self.html)
        return f"Figure({kind}, title={self.title!r}, {size / 1e3:.1f} kB)"

    def __html__(self) -> str:
        return self._repr_html_()

    def _repr_html_(self) -> str:
        return _notebook_html(self.figures, title=None)

    def to_html(self, title: str | None = None) -> str:
        return Page(self.figures, title=title or self.title or "tl_backward").to_html()

    def save(self, path: Union[str, Path], title: str | None = None) -> Path:
        return Page(self.figures, title=title or self.title or "tl_backward").save(path)


def _figures_of(obj: Any) -> tuple[Figure, ...]:
    if isinstance(obj, (Figure, Page)):
        return obj.figures
    raise TLBackwardError(f"can only combine Figure/Page objects, got {type(obj).__name__}", argument="obj")


@dataclass(frozen=True, init=False, repr=False)
class Page:
    """Several figures on one page (bundle included once). ``Page([f1, f2], title="...")``."""

    figures: tuple[Figure, ...]
    title: str

    def __init__(self, figures: Iterable[Figure | "Page"] = (), title: str = "tl_backward"):
        flat: tuple[Figure, ...] = ()
        for f in figures:
            flat += _figures_of(f)
        object.__setattr__(self, "figures", flat)
        object.__setattr__(self, "title", str(title))

    @property
    def needs_bundle(self) -> bool:
        return any(f.needs_bundle for f in self.figures)

    def __add__(self, other: Figure | "Page") -> "Page":
        return Page(self.figures + _figures_of(other), title=self.title)

    def __repr__(self) -> str:
        return f"Page({self.title!r}, {len(self.figures)} figures)"

    def __html__(self) -> str:
        return self._repr_html_()

    def _repr_html_(self) -> str:
        return _notebook_html(self.figures, title=self.title)

    def to_html(self, *, csp: bool = True) -> str:
        """A complete standalone HTML document (UTF-8, no external resources). ``csp=False`` omits
        the Content-Security-Policy meta (only for tests that check the content on its own)."""
        body, scripts = _body(self.figures, title=self.title, include_css=False)
        own = ([bundle_js()] if self.needs_bundle else []) + scripts  # every script we emit, in order
        top = ["<!DOCTYPE html>", '<html lang="en"><head>', '<meta charset="utf-8">']
        if csp:
            top.append(_csp_meta(own))  # from our own scripts, before any content is placed
        top.append('<meta name="viewport" content="width=device-width, initial-scale=1">')
        top += [f"<title>{escape(self.title)}</title>", f"<style>{CSS}</style>"]
        if self.needs_bundle:
            top.append(f"<script>{own[0]}</script>")
        top.append('</head><body class="tlb-page">')
        return "\n".join(top) + "\n" + body + "\n</body></html>\n"

    def save(self, path: Union[str, Path]) -> Path:
        """Write :meth:`to_html` to ``path`` (parent dirs created) and return the Path."""
        p = Path(path)
        if p.suffix.lower() not in (".html", ".htm"):
            raise TLBackwardError(f"path must end in .html or .htm, got {str(path)!r}", argument="path")
        p.parent.mkdir(parents=True, exist_ok=True)
        # Lone surrogates (odd tokenizer output) cannot be UTF-8; replace rather than crash.
        p.write_bytes(self.to_html().encode("utf-8", errors="replace"))
        return p


def page(*figures: Figure | Page, title: str = "tl_backward") -> Page:
    """``page(f1, f2, ..., title=...)`` -- shorthand for ``Page([f1, f2, ...], title=...)``."""
    return Page(figures, title=title)


def _body(figs: tuple[Figure, ...], *, title: str | None, include_css: bool = True,
          bundle: bool = False) -> tuple[str, list[str]]:
    """Figures as an HTML fragment (with the bundle first if ``bundle``), and the script sources
    placed in it, bundle excluded."""
    uid = "tlb-" + uuid.uuid4().hex[:12]
    parts, scripts = [], []
    if include_css:
        parts.append(f"<style>{CSS}</style>")
    if bundle:
        parts.append(f"<script>{bundle_js()}</script>")
    if title:
        parts.append(f'<h1 class="tlb-h1">{escape(title)}</h1>')
    for i, f in enumerate(figs):
        html, js = f._assemble(f"{uid}-{i}")
        parts.append(html)
        scripts += js
    return f'<div class="tlb-root" id="{uid}">' + "\n".join(parts) + "</div>", scripts


def _notebook_html(figs: tuple[Figure, ...], *, title: str | None) -> str:
    needs = any(f.needs_bundle for f in figs)
    return _body(figs, title=title, bundle=needs and send_bundle_now())[0]


# Shown while a mount waits for a bundle sent with another notebook output (notebook_bundle "once").
_WAIT_NOTE = ("circuitsvis's code was sent once, with the first tl_backward figure of this notebook's kernel "
              "session, and that output is not on this page (cleared, deleted, or not rendered yet). To show "
              "this figure: run tl_backward.render.notebook_bundle('once') and re-run this cell (or restart "
              "the kernel and run all).")


def _mount_js(mount_id: str, component: str, props_json: str) -> str:
    """The mount script. Without ``window.CircuitsVis`` yet (its notebook output not rendered yet, or
    missing) it queues itself on ``window.tlbPending`` -- :func:`bundle_js` runs the queue -- and shows
    :data:`_WAIT_NOTE` until then. Errors show as text instead of a blank box."""
    # ids are [a-z0-9-] (generated), component is validated against CV_COMPONENTS; props_json comes
    # from script_json.
    return (
        "(function(){var id=" + script_json(mount_id) + ",el=document.getElementById(id);"
        "function say(cls,t){var p=document.createElement('div');p.className=cls;p.textContent=t;"
        "if(el)el.appendChild(p);return p;}"
        "var wait=null;function go(){try{if(wait&&wait.parentNode)wait.parentNode.removeChild(wait);"
        "CircuitsVis.render(id,CircuitsVis[" + script_json(component) + "]," + props_json + ");"
        "}catch(e){say('tlb-error','circuitsvis failed: '+e);}}"
        "if(window.CircuitsVis){go();return;}"
        "(window.tlbPending=window.tlbPending||[]).push(go);"
        "wait=say('tlb-note tlb-wait'," + script_json(_WAIT_NOTE) + ");})();"
    )


def cv_figure(component: str, props: dict, *, title: str | None = None,
              height: int | str | None = None) -> Figure:
    """Mount the circuitsvis React ``component`` with ``props`` (camelCase names, as the React side
    expects, e.g. ``{"attention": ..., "tokens": ..., "maxValue": ...}``).

    Props with value ``None`` are dropped (the component default applies); tensors/arrays become
    lists with NaN/inf/sentinels -> 0; everything is encoded with :func:`script_json`. Pass raw
    token strings: those a component injects as HTML (:data:`HTML_STRING_PROPS`) are escaped here.
    ``height``: CSS height of the mount area (int = pixels), scrolls when exceeded.
    """
    if component not in CV_COMPONENTS:
        raise TLBackwardError(f"component must be one of {sorted(CV_COMPONENTS)}, got {component!r}",
                              argument="component")
    if not isinstance(props, dict):
        raise TLBackwardError(f"props must be a dict of component props, got {type(props).__name__}", argument="props")
    clean = {k: v for k, v in props.items() if v is not None}
    for key in HTML_STRING_PROPS.get(component, ()):
        if key in clean:
            clean[key] = _escape_strings(clean[key])
    h = f"{int(height)}px" if isinstance(height, (int, float)) else height
    return Figure(title=title, component=component, props_json=script_json(clean), height=h)


def _escape_strings(obj: Any) -> Any:
    if isinstance(obj, str):
        return escape(obj)
    if isinstance(obj, (list, tuple)):
        return [_escape_strings(v) for v in obj]
    return obj


def html_figure(html: str, *, title: str | None = None, scripts: Iterable[str] = ()) -> Figure:
    """Wrap project-owned HTML/SVG (the caller has already escaped every untrusted string with
    :func:`escape`). Must not contain external references; use inline styles/SVG only.

    ``scripts``: JavaScript sources run after the HTML (each in its own ``<script>``, inside the
    figure's div, so ``document.currentScript.parentNode`` is the figure). They are the only scripts
    of the figure a saved page's CSP allows; ``html`` itself must hold none.
    """
    if not isinstance(html, str):
        raise TLBackwardError(f"html must be a str, got {type(html).__name__}", argument="html")
    if re.search(r"<script", html, re.I):
        raise TLBackwardError("html contains a <script> tag: pass the JavaScript source as "
                              "html_figure(html, scripts=[source]) so the page's CSP can allow it",
                              argument="html")
    if isinstance(scripts, str):
        raise TLBackwardError("scripts must be a list of JavaScript sources, got one str: wrap it "
                              "in a list", argument="scripts")
    js = tuple(scripts)
    for src in js:
        if not isinstance(src, str):
            raise TLBackwardError(f"scripts must hold str sources, got {type(src).__name__}", argument="scripts")
        if re.search(r"</script|<!--", src, re.I):  # would end the block early / change its parsing
            raise TLBackwardError("a script contains '</script' or '<!--'; write them as '<\\/script' "
                                  "and '<\\!--' inside JavaScript strings", argument="scripts")
    return Figure(html=html, title=title, scripts=js)
