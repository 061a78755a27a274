"""tl_backward.core.results: read-only dict access for frozen results, FrozenDict, to_dict."""

import copy
import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tl_backward.core.results import NOT_IN_DICT, FrozenDict, Record, to_jsonable
from tl_backward.errors import TLBackwardError


@dataclass(frozen=True)
class Row(Record):
    name: str
    score: float


@dataclass(frozen=True)
class Table(Record):
    rows: tuple[Row, ...]
    per_key: FrozenDict
    weights: torch.Tensor
    model: Any = field(default=None, metadata=NOT_IN_DICT)


def _table() -> Table:
    rows = (Row("a", 0.5), Row("b", 1.25))
    return Table(rows=rows, per_key=FrozenDict({0: 1.5, 5: 2.0}), weights=torch.tensor([[1.0, 2.0]]),
                 model=object())


def test_record_reads_like_the_dict_it_replaces():
    t = _table()
    assert t["rows"] is t.rows and t["per_key"][5] == 2.0 and t.rows[1]["score"] == 1.25
    assert list(t.rows[0]) == ["name", "score"] and len(t.rows[0]) == 2
    assert dict(t.rows[0]) == {"name": "a", "score": 0.5} and {**t.rows[1]} == {"name": "b", "score": 1.25}
    assert "score" in t.rows[0] and "top1" not in t.rows[0] and t.rows[0].get("top1") is None
    with pytest.raises(KeyError, match="fields: name, score"):
        t.rows[0]["top1"]


def test_record_is_frozen_and_keeps_dataclass_equality():
    row = Row("a", 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.score = 1.0
    assert not hasattr(row, "__setitem__")
    assert row == Row("a", 0.5) and row != Row("a", 0.75)
    assert row != {"name": "a", "score": 0.5}  # a record is not a dict
    assert hash(row) == hash(Row("a", 0.5))


def test_frozen_dict_is_an_immutable_picklable_mapping():
    d = FrozenDict({"causal": 0.25, "mas": 0.5})
    assert d == {"causal": 0.25, "mas": 0.5} and d["mas"] == 0.5 and list(d) == ["causal", "mas"]
    with pytest.raises(TypeError):
        d["mas"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        d._data = {}
    assert pickle.loads(pickle.dumps(d)) == d and copy.deepcopy(d) == d
    assert hash(d) == hash(FrozenDict({"mas": 0.5, "causal": 0.25}))
    source = {"x": 1}
    snap = FrozenDict(source)
    source["x"] = 2  # a copy: later changes to the source do not show
    assert snap["x"] == 1


def test_to_dict_is_json_able_plain_data():
    t = _table()
    d = t.to_dict()
    assert d == {"rows": [{"name": "a", "score": 0.5}, {"name": "b", "score": 1.25}],
                 "per_key": {0: 1.5, 5: 2.0}, "weights": t.weights.tolist()}  # model left out
    assert json.loads(json.dumps(d))["per_key"] == {"0": 1.5, "5": 2.0}
    assert pickle.loads(pickle.dumps(t)).to_dict() == d and pickle.loads(pickle.dumps(t.rows)) == t.rows
    with pytest.raises(TLBackwardError, match="NOT_IN_DICT"):
        to_jsonable(object())
