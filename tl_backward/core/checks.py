"""Argument checks shared by every public function of tl_backward.

Each check returns the normalised value or raises :class:`~tl_backward.errors.TLBackwardError`
whose ``.argument`` is the argument's name as the caller spells it and whose message says what was
given and how to fix it. Conventions kept everywhere:

* **Counts and indices are Python ints**, never ``bool`` (``True`` is an ``int`` to Python, but
  ``max_new_tokens=True`` is a mistake) and never floats (``int(1.5)`` would truncate silently).
  Any ``numbers.Integral`` (numpy ints too) is accepted.
* **Negative indices count from the end, as in Python**: for ``n`` layers the valid indices are
  ``-n .. n-1`` and ``-1`` is the last layer; the normalised index is ``index % n``. The same
  holds for heads and positions.
* **Flags are ``True``/``False``** (``"yes"`` or ``1`` are refused), optionally ``None``.
* **Token ids are integer tensors** with a non-empty batch and position axis and every id in
  ``[0, vocab)``, checked before anything reaches an embedding.

This module imports only torch and :mod:`tl_backward.errors`, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from tl_backward.errors import TLBackwardError

__all__ = [
    "is_int", "count", "finite_float", "probability", "flag", "one_of", "index", "layer_index",
    "layer_list", "head_index", "token_tensor", "finite_tensor", "single_use",
]


def _shown(value: Any) -> str:
    """A short description of a value for messages: its type and a clipped repr."""
    return f"{type(value).__name__} {value!r:.60}"


def is_int(value: Any) -> bool:
    """True for ints (numpy ints too), False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count(value: Any, argument: str, *, minimum: int = 0, maximum: int | None = None,
          none_ok: bool = False, hint: str = "") -> int | None:
    """``value`` as an int in ``[minimum, maximum]`` (``maximum`` None: unbounded)."""
    if value is None and none_ok:
        return None
    if maximum is not None:
        bound = f"an int in [{minimum}, {maximum}]"
    else:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    extra = f" ({hint})" if hint else ""
    if not is_int(value):
        raise TLBackwardError(f"{argument} must be {bound}{extra}, got {_shown(value)}", argument=argument)
    value = int(value)
    if value < minimum or maximum is not None and value > maximum:
        raise TLBackwardError(f"{argument} must be {bound}{extra}, got {value}", argument=argument)
    return value


def finite_float(value: Any, argument: str, *, positive: bool = False, minimum: float | None = None,
                 none_ok: bool = False, hint: str = "") -> float | None:
    """``value`` as a finite float; ``positive`` requires > 0, ``minimum`` requires >= minimum.

    Accepts ints, floats and one-element real tensors; refuses bools, strings, NaN and ±inf.
    """
    if value is None and none_ok:
        return None
    extra = f" ({hint})" if hint else ""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TLBackwardError(f"{argument} must be a number{extra}, got {_shown(value)}", argument=argument)
    value = float(value)
    if not math.isfinite(value):
        raise TLBackwardError(f"{argument} must be finite{extra}, got {value}", argument=argument)
    if positive and value <= 0:
        raise TLBackwardError(f"{argument} must be > 0, a positive number{extra}, got {value:g}", argument=argument)
    if minimum is not None and value < minimum:
        raise TLBackwardError(f"{argument} must be >= {minimum:g}{extra}, got {value:g}", argument=argument)
    return value


def probability(value: Any, argument: str, *, open_zero: bool = False) -> float:
    """A float in ``[0, 1]`` (``(0, 1]`` with ``open_zero``)."""
    p = finite_float(value, argument)
    if p > 1 or p < 0 or open_zero and p == 0:
        interval = "(0, 1]" if open_zero else "[0, 1]"
        raise TLBackwardError(f"{argument} must be a fraction in {interval}, got {p:g}", argument=argument)
    return p


def flag(value: Any, argument: str, *, none_ok: bool = False) -> bool | None:
    """``True``/``False`` (or None with ``none_ok``); strings such as ``"yes"`` and ints are refused."""
    if isinstance(value, bool) or none_ok and value is None:
        return value
    allowed = "True, False or None" if none_ok else "True or False"
    raise TLBackwardError(f"{argument} must be {allowed}, got {_shown(value)}", argument=argument)


def one_of(value: Any, argument: str, choices: Sequence[Any], *, hint: str = "") -> Any:
    """``value`` if it is one of ``choices``."""
    if isinstance(value, Tensor) or value not in choices:
        extra = f" ({hint})" if hint else ""
        raise TLBackwardError(f"{argument} must be one of {', '.join(map(repr, choices))}{extra}, got "
                              f"{value!r:.60}", argument=argument)
    return value


def index(value: Any, size: int, argument: str, what: str = "index", owner: str = "") -> int:
    """A Python-style index into ``size`` items (``-size .. size-1``), normalised to ``0 .. size-1``.

    ``what`` names one item (``"layer"``); ``owner`` says whose items they are (``"the model"``).
    Messages start with ``argument`` unless ``what`` is its singular (``layers``/``layer``).
    """
    prefix = "" if argument in (what, what + "s") else f"{argument}: "
    span = f"0..{size - 1}, or -{size}..-1 counting from the end"
    where = f"{owner} has {what}s {span}" if owner else f"{what} must be in {span}"
    if not is_int(value):
        shown = f"({where})" if owner else f"in {span}"
        raise TLBackwardError(f"{prefix}{what} must be an int {shown}, got {_shown(value)}", argument=argument)
    value = int(value)
    if not -size <= value < size:
        raise TLBackwardError(f"{prefix}{what} {value} is out of range: {where}", argument=argument)
    return value % size


def layer_index(layer: Any, n_layers: int, argument: str = "layer") -> int:
    """A model layer: ``-n_layers .. n_layers-1`` (``-1`` = the last layer), normalised to ``0 .. n-1``."""
    return index(layer, n_layers, argument, "layer", "the model")


def layer_list(layers: Any, n_layers: int, argument: str = "layers", *, distinct: bool = True) -> list[int]:
    """A ``layers`` argument: None (every layer), one layer, or a sequence of layers.

    Each entry is checked with :func:`layer_index` (negative counts from the end). With
    ``distinct`` (the default), two entries naming the same layer (``[1, 1]``, or ``[1, -1]`` on a
    2-layer model) are refused; callers that take a set of layers pass ``distinct=False``.
    """
    if layers is None:
        return list(range(n_layers))
    if is_int(layers):
        return [layer_index(layers, n_layers, argument)]
    if isinstance(layers, Tensor) and layers.ndim <= 1 and not layers.is_floating_point() \
            and not layers.is_complex() and layers.dtype != torch.bool:
        layers = layers.reshape(-1).tolist()
    if not isinstance(layers, (list, tuple, range)):
        raise TLBackwardError(f"{argument} must be None (every layer), a layer index or a list of layer "
                              f"indices, got {_shown(layers)}", argument=argument)
    if len(layers) == 0:
        raise TLBackwardError(f"{argument} is empty: pass None for every layer or a list of layer indices",
                              argument=argument)
    out = [layer_index(l, n_layers, argument) for l in layers]
    dupes = sorted({l for l in out if out.count(l) > 1})
    if dupes and distinct:
        raise TLBackwardError(f"{argument} names layer(s) {dupes} more than once ({list(layers)}; negative "
                              "indices count from the end): list each layer once", argument=argument)
    return out


def head_index(head: Any, n_heads: int, argument: str = "heads", owner: str = "the model") -> int:
    """A head: ``-n_heads .. n_heads-1``, normalised to ``0 .. n_heads-1``."""
    return index(head, n_heads, argument, "head", owner)


def token_tensor(ids: Any, argument: str, vocab: int | None = None) -> Tensor:
    """Token ids as a ``[batch, pos]`` long tensor (a 1-D tensor becomes one row).

    Refuses non-tensors, float/complex/bool dtypes, other ranks, an empty batch or position axis,
    and (with ``vocab``) ids outside ``[0, vocab)``, so a bad id never reaches an embedding.
    """
    if not isinstance(ids, Tensor):
        raise TLBackwardError(f"{argument} must be a tensor of token ids, got {_shown(ids)}", argument=argument)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TLBackwardError(f"{argument}: token ids must be an integer tensor (torch.long), got {ids.dtype}",
                              argument=argument)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise TLBackwardError(f"{argument}: token ids must have shape [pos] or [batch, pos], got "
                              f"{tuple(ids.shape)}", argument=argument)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise TLBackwardError(f"{argument} is empty (shape {tuple(ids.shape)}): pass at least one row of at "
                              "least one token", argument=argument)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or vocab is not None and high >= vocab:
        bad = low if low < 0 else high
        where = f"[0, {vocab})" if vocab is not None else "[0, vocabulary size)"
        raise TLBackwardError(f"{argument} holds token id {bad}, outside the vocabulary {where}",
                              argument=argument)
    return ids.long()


def finite_tensor(value: Any, argument: str, what: str = "") -> Tensor:
    """A floating-point tensor with no NaN or ±inf."""
    name = what or argument
    if not isinstance(value, Tensor) or not value.is_floating_point():
        shown = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TLBackwardError(f"{name} must be a floating-point tensor, got {shown}", argument=argument)
    if not bool(torch.isfinite(value).all()):
        n_bad = int((~torch.isfinite(value)).sum())
        raise TLBackwardError(f"{name} holds {n_bad} NaN or infinite values: pass finite numbers",
                              argument=argument)
    return value


# ------------------------------------------------------------------------------------------ contexts
class _SingleUse:
    """A context manager that can be entered once; a second ``with`` raises instead of failing
    inside contextlib (``AttributeError``) or silently running without its effect."""

    def __init__(self, inner: contextlib.AbstractContextManager, name: str):
        self._inner = inner
        self._name = name
        self._entered = False

    def __enter__(self) -> Any:
        if self._entered:
            raise TLBackwardError(
                f"this {self._name}(...) object was already entered; each with-block needs its own call: "
                f"write `with {self._name}(...):` again instead of reusing the object", argument=self._name)
        self._entered = True
        return self._inner.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)


def single_use(fn: Callable[..., Iterable[Any]]) -> Callable[..., _SingleUse]:
    """Like ``contextlib.contextmanager``, but the object refuses to be entered a second time."""
    make = contextlib.contextmanager(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _SingleUse:
        return _SingleUse(make(*args, **kwargs), fn.__name__)

    return wrapper
