"""Escaping for untrusted text: HTML content and attributes, and JSON inlined in ``<script>``.

Every token, prompt or label placed in a page passes through :func:`escape` (HTML) or
:func:`script_json` (script data); :func:`jsonable` turns tensors and arrays into plain JSON.
"""

from __future__ import annotations

import html as _html
import json
import math
import re
from typing import Any

import numpy as np

from ..errors import TLBackwardError

__all__ = ["escape", "jsonable", "script_json"]

# Values this large are masking sentinels (finfo.min / finfo.max of fp32, bf16, fp64), not data.
_SENTINEL = 1e30
# Array floats are rounded to this many significant digits for display (hover shows the value).
_SIG_DIGITS = 6


def escape(text: Any) -> str:
    """HTML-escape ``text`` (``str()`` of it) for element content AND quoted attribute values.

    Escapes ``& < > " '``. Use on every token, label or title placed in project-owned HTML/SVG.
    """
    return _html.escape(str(text), quote=True)


_SCRIPT_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")


def script_json(obj: Any) -> str:
    """Encode ``obj`` as JSON that is safe to inline inside ``<script>`` (as a JS expression).

    ``< > &`` become ``\\u003c \\u003e \\u0026`` so no string can form ``</script>`` or ``<!--``;
    U+2028/2029 are escaped so the JSON is also valid JavaScript. These characters only occur inside
    JSON strings, where the escapes decode to the same text. ``obj`` is first passed through
    :func:`jsonable` (tensors/arrays -> lists, NaN/inf -> 0).
    """
    text = json.dumps(jsonable(obj), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group(0)], text)


def _clean_float(x: float) -> float:
    return 0.0 if (math.isnan(x) or math.isinf(x) or abs(x) >= _SENTINEL) else x


def _round_floats(a: np.ndarray, sig: int = _SIG_DIGITS) -> np.ndarray:
    """Zero NaN/inf/sentinels and round to ``sig`` significant digits (vectorised), so JSON holds
    ``0.0149671`` instead of float32 noise like ``0.014967052266001701`` -- 3x smaller pages."""
    a = np.where(np.isfinite(a) & (np.abs(a) < _SENTINEL), a, 0.0)
    with np.errstate(divide="ignore"):
        exp = np.floor(np.log10(np.abs(a), where=a != 0, out=np.zeros_like(a)))
    scale = 10.0 ** (sig - 1 - exp)
    return np.round(a * scale) / scale


def jsonable(obj: Any) -> Any:
    """Convert props to plain JSON types: tensors/numpy -> nested lists (floats as float64),
    numpy scalars -> Python scalars, tuples -> lists; NaN, +-inf and masking sentinels
    (|x| >= 1e30, e.g. ``finfo.min``) -> 0; array floats rounded to 6 significant digits. Dict keys become strings; ``None`` stays ``None``."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return _clean_float(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    mod = type(obj).__module__
    if mod.startswith("torch"):
        t = obj.detach().cpu()
        if t.is_floating_point():
            return _round_floats(t.double().numpy()).tolist()
        return t.tolist()
    if mod.startswith("numpy"):
        a = np.asarray(obj)
        if a.dtype.kind == "f":
            a = _round_floats(a.astype(np.float64))
        return a.tolist() if a.ndim else a.item()
    raise TLBackwardError(f"cannot encode {type(obj).__name__!r} as a figure prop; pass lists, numbers, "
                          "strings, dicts, numpy arrays or torch tensors", argument="props")
