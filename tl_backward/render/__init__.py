"""Rendering, generic only: offline-safe HTML pages of circuitsvis components and project-owned
HTML/SVG. It knows no method: each paper's pictures live in its own folder (``attention/render.py``,
``lens/render.py``, ``flow/render.py``, ``masking/render.py``) and use these building blocks.

Import is light: submodules load on first attribute access (``from tl_backward.render import page``
or ``tl_backward.render.attention_heads``). See :mod:`tl_backward.render.page` for the Figure/Page
API and :mod:`tl_backward.render.figures` for reusable figures. (The ``page(*figs)`` helper is not
re-exported here because ``tl_backward.render.page`` is the submodule; use ``Page([...])`` or ``a + b``.)
"""

from importlib import import_module

_EXPORTS = {
    "escape": "escaping", "script_json": "escaping", "jsonable": "escaping", "Figure": "page", "Page": "page",
    "cv_figure": "page", "html_figure": "page", "notebook_bundle": "notebook",
    "attention_heads": "figures", "attention_pattern": "figures", "colored_tokens": "figures",
    "colored_tokens_multi": "figures", "heatmap_table": "figures", "line_plot": "figures",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        mod = import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
