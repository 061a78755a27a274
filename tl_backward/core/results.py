"""Read access shared by the experiments' frozen result dataclasses.

The experiments (``attention/icl.py``, ``attention/perturbation.py``, ``lens/experiment.py``,
``masking/experiment.py``) return frozen dataclasses whose rows are tuples of frozen row
dataclasses. They used to return plain dicts; :class:`Record` keeps the dict-style *reads* of that
era working -- ``result["rows"]`` is ``result.rows``, ``row["top1"]`` is ``row.top1``, ``dict(row)``
and ``{**row}`` give the fields -- while assignment raises ``dataclasses.FrozenInstanceError``.

* :class:`Record` -- a read-only ``Mapping`` from field names to values, mixed into a frozen
  dataclass, plus :meth:`Record.to_dict` (JSON-able plain data).
* :class:`FrozenDict` -- an immutable, picklable mapping for small per-key fields (the fit loss per
  n_shots, the two arms of a comparison). ``types.MappingProxyType`` would do, except that it can be
  neither pickled nor deep-copied, and a result should survive both.
* :func:`to_jsonable` -- the conversion behind :meth:`Record.to_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..errors import TLBackwardError

__all__ = ["Record", "FrozenDict", "to_jsonable", "NOT_IN_DICT"]

# Field metadata for values that are not data (a model, its weights): left out of to_dict().
NOT_IN_DICT = {"to_dict": False}


def to_jsonable(value: Any) -> Any:
    """Plain data for ``json.dumps``: records and dataclasses -> dicts of their fields (fields
    marked :data:`NOT_IN_DICT` left out), mappings -> dicts (keys kept; ``json`` writes int keys as
    strings), tuples/lists -> lists, tensors -> nested lists, numbers/strings/None as they are."""
    if isinstance(value, Record):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields_dict(value)
    if isinstance(value, Mapping):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TLBackwardError(
        f"to_dict() cannot turn a {type(value).__name__} into JSON-able data; mark the field "
        "with metadata=NOT_IN_DICT (tl_backward.core.results) to leave it out", argument="value")


def _fields_dict(obj: Any) -> dict[str, Any]:
    return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if f.metadata.get("to_dict", True)}


class Record(Mapping):
    """Mixin for frozen result dataclasses: a read-only mapping from field names to values.

    ``record[name]`` is ``getattr(record, name)`` for every field (a KeyError naming the fields
    otherwise); ``keys()``, ``items()``, ``get()``, ``in`` and ``len()`` follow from ``Mapping``.
    Equality stays the dataclass's (same type, equal fields), not a dict comparison.
    """

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        names = self._field_names()
        if key not in names:
            raise KeyError(f"{type(self).__name__} has no field {key!r}; fields: {', '.join(names)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def __len__(self) -> int:
        return len(self._field_names())

    def _field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        """Every field (except those marked :data:`NOT_IN_DICT`) as JSON-able plain data
        (:func:`to_jsonable`): ``json.dumps(result.to_dict())`` works."""
        return _fields_dict(self)


class FrozenDict(Mapping):
    """An immutable mapping (a copy of ``data``): reads as a dict, compares equal to a dict with the
    same items, cannot be assigned to, pickles and deep-copies."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping | Any = ()):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to {name!r}: FrozenDict is immutable")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete {name!r}: FrozenDict is immutable")

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __reduce__(self):
        return (FrozenDict, (self._data,))

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"
