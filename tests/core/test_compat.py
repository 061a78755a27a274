"""tl_backward/core/compat.py: every TransformerLens name resolves in the installed version, and that
version lies in the range pyproject.toml declares (so pip never has to change it)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.requirements import Requirement

from tests.tolerance import assert_close_fp32
from tl_backward.core import compat
from tl_backward.errors import BridgeUnavailable

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_every_exported_name_resolves():
    optional = {"HookedTransformer", "HookedTransformerConfig", "HookedLayerNorm", "weight_conversions"}  # None on 4.x
    for name in compat.__all__:
        value = getattr(compat, name)
        assert value is not None or name in optional, name
    assert (compat.HookedTransformer is None) == (compat.TL_MAJOR >= 4)


def test_installed_transformer_lens_is_in_the_declared_range():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d) for d in deps if d.startswith("transformer_lens")]
    assert compat.TL_VERSION in spec.specifier, (compat.TL_VERSION, str(spec.specifier))
    assert all(v in spec.specifier for v in ("2.2.0", "2.18.0", "3.9.0", "4.3.0"))
    assert "2.1.0" not in spec.specifier and "5.0.0" not in spec.specifier  # 2.1: no weight_conversions


@pytest.mark.parametrize("model", [object(), None])
def test_is_hooked_transformer_is_false_for_other_objects(model):
    assert not compat.is_hooked_transformer(model)


def test_bridge_names_are_real_or_refusing_placeholders():
    """3.9/4.x: the bridge classes come from transformer_lens.model_bridge. 2.x: placeholders nothing is an
    instance of, whose use raises BridgeUnavailable naming the fix; require_bridge refuses up front."""
    assert compat.HAS_BRIDGE == (compat.TL_MAJOR >= 3)
    if compat.HAS_BRIDGE:
        assert compat.TransformerBridge.__module__.startswith("transformer_lens.model_bridge")
        compat.require_bridge("anything")
        return
    assert not isinstance(object(), compat.AttentionBridge) and not isinstance(None, compat.TransformerBridge)
    assert compat.unwrap_bridge(compat) is compat
    assert not hasattr(compat.TransformerBridge, "_private")  # introspection still gets AttributeError
    for use in (lambda: compat.TransformerBridge.boot_transformers("gpt2"), compat.NativeModel,
                lambda: compat.require_bridge("load_model(backend='bridge')", argument="backend")):
        with pytest.raises(BridgeUnavailable, match=r"pip install 'transformer_lens>=3\.9'.*backend='hooked'"):
            use()


def test_alias_map_names_the_hook_points_whose_key_is_not_their_name():
    hooks = {"blocks.0.hook_q": SimpleNamespace(name="blocks.0.attn.q.hook_out"),
             "hook_embed": SimpleNamespace(name="hook_embed"), "nested": {"x": SimpleNamespace(name="y")}}
    assert compat.build_alias_to_canonical_map(hooks) == {"blocks.0.hook_q": "blocks.0.attn.q.hook_out",
                                                          "nested.x": "y"}


@pytest.mark.skipif(compat.HookedLayerNorm is None, reason=f"TransformerLens {compat.TL_VERSION}: no HookedTransformer")
def test_layernorm_hook_flag_says_where_hook_normalized_fires():
    """Run a HookedTransformer LayerNorm with a generic gain and bias: its hook_normalized carries x/scale
    (TransformerLens >= 3) or x/scale · w + b (2.x), as LAYERNORM_HOOK_AFTER_AFFINE claims."""
    cfg = compat.HookedTransformerConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, act_fn="gelu", d_vocab=5)
    ln = compat.HookedLayerNorm(cfg)
    with torch.no_grad():
        ln.w.copy_(torch.linspace(0.5, 2.0, 8))
        ln.b.copy_(torch.linspace(-1.0, 1.0, 8))
    seen = []
    ln.hook_normalized.add_hook(lambda t, hook: seen.append(t.detach()))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    out = ln(x)
    ln.hook_normalized.remove_hooks()
    plain = torch.nn.functional.layer_norm(x, (8,), eps=cfg.eps)
    assert_close_fp32(seen[0], out if compat.LAYERNORM_HOOK_AFTER_AFFINE else plain, n_terms=8)
    assert_close_fp32(out, plain * ln.w + ln.b, n_terms=8)
