"""How notebook outputs carry circuitsvis's bundle: once per kernel session, or in every output.

:func:`notebook_bundle` reads or sets the mode; :func:`send_bundle_now` tells the page code
(:mod:`tl_backward.render.page`) whether the output being rendered must carry the bundle.
"""

from __future__ import annotations

import sys
from typing import Any

from ..errors import TLBackwardError

__all__ = ["NOTEBOOK_MODES", "notebook_bundle", "send_bundle_now"]

NOTEBOOK_MODES = ("once", "always")
# mode: None = automatic; sent: (cell id or None, execute_request msg_id) of the output that carried
# the bundle in this kernel process (resets with the kernel).
_notebook: dict[str, Any] = {"mode": None, "sent": None}


def notebook_bundle(mode: str | None = None) -> str:
    """Get (``mode=None``) or set how notebook outputs carry circuitsvis's 1.3 MB bundle; returns the
    mode in force.

    * ``"once"`` (default, except in Colab): the first figure displayed in a kernel session carries
      the bundle (a classic script defining ``window.CircuitsVis``); later figures only mount and
      reuse it -- JupyterLab, Notebook 7, VS Code and nbconvert's HTML put a notebook's outputs in
      one document. It is sent again after a kernel restart, when the cell that carried it is
      re-executed (its output is replaced; needs the cell id JupyterLab and VS Code send with each
      execution), and after ``notebook_bundle("once")``.
    * ``"always"``: every output carries its own copy. The default in Colab (``google.colab``
      imported), which puts each output in its own iframe; use it for any frontend that does.

    The tradeoff of ``"once"``: later figures depend on the output that carried the bundle. They
    wait for it, so render order does not matter; if it is not on the page (cleared or deleted),
    they show a note saying how to re-send it rather than a blank box. Outside a running kernel
    (e.g. a script writing ``_repr_html_()`` to a file) every output is self-contained. Saved pages
    (``save``/``to_html``) always hold the bundle once. Setting a mode forgets that it was sent.
    """
    if mode is not None:
        if mode not in NOTEBOOK_MODES:
            raise TLBackwardError(f"mode must be one of {NOTEBOOK_MODES} (or None to read it), got {mode!r}",
                                  argument="mode")
        _notebook.update(mode=mode, sent=None)
    if _notebook["mode"] is not None:
        return _notebook["mode"]
    return "always" if "google.colab" in sys.modules else "once"


def _kernel_request() -> tuple[str | None, str] | None:
    """``(cell id, msg id)`` of the execute request a kernel is running now, None outside a kernel."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return None
    try:
        parent = kernel.get_parent()
    except Exception:  # older ipykernel: the shell keeps the parent header
        parent = {"header": getattr(shell, "parent_header", {}).get("header", {}),
                  "metadata": getattr(shell, "parent_header", {}).get("metadata", {})}
    cell = (parent.get("metadata") or {}).get("cellId")
    return (str(cell) if cell else None), str((parent.get("header") or {}).get("msg_id", ""))


def send_bundle_now() -> bool:
    """Whether this notebook output must carry the bundle (and note that it did)."""
    request = _kernel_request()
    if request is None or notebook_bundle() == "always":
        return True
    sent = _notebook["sent"]
    if sent is None or (request[0] is not None and request[0] == sent[0] and request[1] != sent[1]):
        _notebook["sent"] = request  # first time, or the carrying cell re-executed (output replaced)
        return True
    return False
