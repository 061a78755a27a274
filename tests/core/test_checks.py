"""tl_backward/core/checks.py: each check returns the normalised value or raises TLBackwardError
naming the argument; core/checks.py imports nothing of tl_backward but the error type."""

import math

import numpy as np
import pytest
import torch

from tl_backward.core import checks
from tl_backward.errors import TLBackwardError
from tests.layout import ROOT, imports_of, modules


def refused(fn, *args, argument, match, **kwargs):
    with pytest.raises(TLBackwardError, match=match) as err:
        fn(*args, **kwargs)
    assert err.value.argument == argument
    return err.value


def test_checks_imports_only_the_error_type():
    mods = modules()
    found = {i.target for i in imports_of("tl_backward.core.checks", ROOT / "core" / "checks.py", set(mods))}
    assert found == {"tl_backward.errors"}


@pytest.mark.parametrize("value, expected", [(0, 0), (7, 7), (np.int64(3), 3), (-1, -1)])
def test_count_accepts_ints_and_returns_python_ints(value, expected):
    got = checks.count(value, "n", minimum=-1)
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value, match", [
    (True, "n must be an int >= 0, got bool True"), (1.0, "got float 1.0"), ("3", "got str"),
    (None, "got NoneType"), (-1, "got -1"), (torch.tensor(2), "got Tensor"),
])
def test_count_refuses_bools_floats_and_out_of_range(value, match):
    refused(checks.count, value, "n", argument="n", match=match)


def test_count_bounds_none_and_hints():
    assert checks.count(None, "k", none_ok=True) is None
    assert checks.count(5, "k", minimum=1, maximum=5) == 5
    refused(checks.count, 6, "k", minimum=1, maximum=5, argument="k", match=r"k must be an int in \[1, 5\]")
    refused(checks.count, 0, "k", minimum=1, argument="k", match="k must be a positive int")
    refused(checks.count, -2, "n_heads", minimum=-1, hint="-1 keeps all", argument="n_heads",
            match=r"n_heads must be an int >= -1 \(-1 keeps all\)")


@pytest.mark.parametrize("value, expected", [(1, 1.0), (0.5, 0.5), (np.float32(2.0), 2.0), (torch.tensor(3.0), 3.0)])
def test_finite_float_accepts_reals(value, expected):
    got = checks.finite_float(value, "x")
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value, kwargs, match", [
    (math.nan, {}, "x must be finite"), (math.inf, {}, "x must be finite"), (-math.inf, {}, "x must be finite"),
    (True, {}, "x must be a number"), ("1", {}, "x must be a number"), (1 + 1j, {}, "x must be a number"),
    (torch.ones(2), {}, "x must be a number"), (None, {}, "x must be a number"),
    (0.0, dict(positive=True), "x must be > 0"), (-0.5, dict(minimum=0.0), "x must be >= 0"),
])
def test_finite_float_refuses(value, kwargs, match):
    refused(checks.finite_float, value, "x", **kwargs, argument="x", match=match)


def test_probability():
    assert checks.probability(0, "p") == 0.0 and checks.probability(1, "p") == 1.0
    refused(checks.probability, 0, "p", open_zero=True, argument="p", match=r"\(0, 1\]")
    refused(checks.probability, 1.5, "p", argument="p", match=r"\[0, 1\]")
    refused(checks.probability, math.nan, "p", argument="p", match="finite")


def test_flag_and_one_of():
    assert checks.flag(True, "f") is True and checks.flag(None, "f", none_ok=True) is None
    for bad in ("yes", 1, 0, None):
        refused(checks.flag, bad, "f", argument="f", match="f must be True or False")
    assert checks.one_of("a", "w", ("a", "b")) == "a"
    refused(checks.one_of, "c", "w", ("a", "b"), argument="w", match="w must be one of 'a', 'b', got 'c'")
    refused(checks.one_of, torch.tensor(1), "w", (1, 2), argument="w", match="w must be one of")


def test_index_is_python_style():
    assert [checks.index(i, 3, "i") for i in (-3, -2, -1, 0, 1, 2)] == [0, 1, 2, 0, 1, 2]
    for bad in (3, -4):
        refused(checks.index, bad, 3, "i", argument="i", match=f"index {bad} is out of range: index must be in 0..2")
    refused(checks.index, 1.0, 3, "i", argument="i", match="index must be an int")


def test_layer_index_and_list():
    assert checks.layer_index(-1, 4) == 3 and checks.layer_index(0, 4) == 0
    refused(checks.layer_index, 4, 4, argument="layer", match="layer 4 is out of range: the model has layers 0..3")
    refused(checks.layer_index, True, 4, argument="layer", match="layer must be an int")
    assert checks.layer_list(None, 3) == [0, 1, 2]
    assert checks.layer_list(-1, 3) == [2]
    assert checks.layer_list([2, -3], 3) == [2, 0]
    assert checks.layer_list(range(1, 3), 3) == [1, 2]
    assert checks.layer_list(torch.tensor([0, -1]), 3) == [0, 2]
    assert checks.layer_list([1, -2], 3, distinct=False) == [1, 1]
    refused(checks.layer_list, [1, -2], 3, argument="layers", match=r"names layer\(s\) \[1\] more than once")
    refused(checks.layer_list, [], 3, argument="layers", match="layers is empty")
    refused(checks.layer_list, 1.0, 3, argument="layers", match="layers must be None")
    refused(checks.layer_list, "0", 3, argument="layers", match="layers must be None")
    refused(checks.layer_list, [0, None], 3, argument="layers", match="the model has layers 0..2")


def test_head_index():
    assert checks.head_index(-1, 4) == 3
    refused(checks.head_index, 4, 4, argument="heads", match="head 4 is out of range: the model has heads 0..3")
    refused(checks.head_index, 1.5, 4, argument="heads", match="head must be an int")


def test_token_tensor():
    out = checks.token_tensor(torch.tensor([1, 2], dtype=torch.int32), "ids", 5)
    assert out.dtype == torch.long and out.tolist() == [[1, 2]]
    for bad, match in [
        (torch.tensor([1.0]), "integer tensor"), (torch.tensor([1 + 0j]), "integer tensor"),
        (torch.tensor([True]), "integer tensor"), ([1, 2], "must be a tensor"),
        (torch.zeros(0, 2, dtype=torch.long), r"empty \(shape \(0, 2\)\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"empty \(shape \(2, 0\)\)"),
        (torch.zeros(1, 1, 1, dtype=torch.long), r"shape \[pos\] or \[batch, pos\]"),
        (torch.tensor([1, 5]), r"token id 5, outside the vocabulary \[0, 5\)"),
        (torch.tensor([-1, 2]), "token id -1"),
    ]:
        refused(checks.token_tensor, bad, "ids", 5, argument="ids", match=match)
    assert checks.token_tensor(torch.tensor([[7]]), "ids").tolist() == [[7]]  # no vocabulary: any id >= 0


def test_finite_tensor():
    t = torch.ones(2)
    assert checks.finite_tensor(t, "d") is t
    refused(checks.finite_tensor, torch.tensor([1.0, math.nan, math.inf]), "d", argument="d",
            match="holds 2 NaN or infinite values")
    refused(checks.finite_tensor, torch.ones(2, dtype=torch.long), "d", argument="d", match="floating-point")


def test_single_use_context_refuses_a_second_entry_and_passes_exceptions_through():
    events = []

    @checks.single_use
    def ctx(x):
        events.append(("enter", x))
        try:
            yield x * 2
        finally:
            events.append(("exit", x))

    cm = ctx(3)
    with cm as value:
        assert value == 6
    refused(cm.__enter__, argument="ctx", match=r"this ctx\(\.\.\.\) object was already entered")
    with pytest.raises(KeyError, match="inner"):
        with ctx(4):
            raise KeyError("inner")
    assert events == [("enter", 3), ("exit", 3), ("enter", 4), ("exit", 4)]
    assert ctx.__name__ == "ctx"
