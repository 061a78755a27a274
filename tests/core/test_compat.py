"""tl_backward/core/compat.py: every TransformerLens name resolves in the installed version, and that
version lies in the range pyproject.toml declares (so pip never has to change it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tl_backward.core import compat

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_every_exported_name_resolves():
    optional = {"HookedTransformer", "HookedTransformerConfig", "weight_conversions"}  # None on TransformerLens 4.x
    for name in compat.__all__:
        value = getattr(compat, name)
        assert value is not None or name in optional, name
    assert (compat.HookedTransformer is None) == (compat.TL_MAJOR >= 4)


def test_installed_transformer_lens_is_in_the_declared_range():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if d.startswith("transformer_lens")]
    assert compat.TL_VERSION in spec.specifier, (compat.TL_VERSION, str(spec.specifier))
    assert "3.9.0" in spec.specifier and "4.3.0" in spec.specifier and "5.0.0" not in spec.specifier


@pytest.mark.parametrize("model", [object(), None])
def test_is_hooked_transformer_is_false_for_other_objects(model):
    assert not compat.is_hooked_transformer(model)
