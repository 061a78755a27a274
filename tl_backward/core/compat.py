"""Every TransformerLens name tl_backward uses, resolved once for the installed TransformerLens.

Supported: TransformerLens 2.2 … 4.x (``pyproject.toml``). What moved between them, checked by
importing each name in a 2.18.0, a 3.9.0 and a 4.3.0 venv:

===================================  ==========================  =================================  =================
name                                 2.x                         3.9                                4.x
===================================  ==========================  =================================  =================
``TransformerBridge`` and the        absent (no model_bridge):   ``transformer_lens.model_bridge``  also top level
bridge classes                       placeholders, HAS_BRIDGE    (``HAS_BRIDGE`` True)
``build_alias_to_canonical_map``     absent (written out here)   ``….model_bridge.bridge``          ``….bridge_core``
``HookedTransformer`` / ``…Config``  top level                   top level                          removed (None)
``pretrained.weight_conversions``    HF → HookedTransformer      the same                           None
``get_act_name`` / ``get_device``    ``transformer_lens.utils``  ``transformer_lens.utilities``     ``….utilities``
LayerNorm's ``hook_normalized``      after the gain and bias     before them                        (none)
HookedTransformer's KV cache         ``past_key_value_caching``  ``TransformerLensKeyValueCache``   (none)
``POST_NORM_ARCHITECTURES``          absent (empty here)         ``utilities.architectures``        the same
===================================  ==========================  =================================  =================

Everything else of the bridge (the attention/MoE bridge classes, ``ArchitectureAdapter``, ``NativeModel``)
sits at the same path in 3.9 and 4.x; ``ActivationCache`` at the same path in all three.

**TransformerLens 2.x** (no ``transformer_lens.model_bridge``): every bridge name here is a placeholder
class of the same name that nothing is an instance of (``isinstance(x, AttentionBridge)`` is False) and
whose use (``TransformerBridge.boot_transformers(...)``, instantiation) raises :class:`BridgeUnavailable`,
a :class:`~tl_backward.errors.TLBackwardError` naming the fix (TransformerLens >= 3.9);
:func:`require_bridge` raises it before a bridge is booted (``load_model(backend="bridge")``, once ``name``
has been checked). The HookedTransformer backend (:mod:`tl_backward.core.hooked`) works there, with three
differences handled where they bite: 2.x's ``LayerNorm`` fires ``hook_normalized`` after its gain and bias
(:data:`LAYERNORM_HOOK_AFTER_AFFINE`), its ``Unembed`` has no ``hook_in`` (metrics read the full logits),
and its ``process_weights_`` leaves stale entries in ``hook_dict`` (refused by
``HookedAdapter.check_model``: call ``model.setup()``).

**Why 2.2 is the floor.** 2.2 is the first release with ``transformer_lens.pretrained.weight_conversions``
(``load_model(backend="hooked")`` converts HF weights with it) and the ``attn_scores_soft_cap`` /
``output_logits_soft_cap`` config fields: 2.0.0 fails tests/core/test_hooked*.py for lack of both, and 2.1
has neither. Tested here with torch 2.13: 2.18.0 (transformers 4.57.6; the whole suite, ``make test-tl2``),
2.16.1 (transformers 5.24) and 2.2.0 (transformers 4.57.6) on tests/core/test_hooked.py,
test_hooked_loading.py and test_compat.py. Caveats that are TransformerLens's own: 2.2 … 2.15 read
``transformers.TRANSFORMERS_CACHE``, which transformers 5 removed, and declare no upper bound, so they import
only next to transformers < 5 (a fresh ``pip install 'transformer_lens==2.2.*'`` pulls transformers 5 and
fails at ``import transformer_lens``); 2.13.0 and 2.14.0 pin ``torch<2.5``, so pip cannot install them next
to torch 2.13 at all ("transformer-lens 2.14.0 depends on torch<2.5 and >=2.2"; 2.14.1 dropped the cap);
2.17+ cap ``huggingface-hub<1`` and so get transformers 4.x. 2.16+ pin ``numpy<2`` on Python < 3.12, and
pyarrow ≥ 26 (pulled in through ``datasets``) refuses to import on numpy 1.x although its metadata does not
say so: ``make test-tl2`` installs with the constraint ``pyarrow<26`` (and ``torch==2.13.0``, so pip never
swaps torch). 3.0 … 3.8 lie inside the range untested.

:data:`HookedTransformer` is None on TransformerLens 4.x, where the class was removed; the
HookedTransformer backend is then never selected.
``tl_backward.zoo`` (a layer below core) imports ``transformer_lens.model_bridge.TransformerBridge``
itself, lazily in ``tiny_model``, and turns its absence on 2.x into the same refusal.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from typing import Any

from transformer_lens.ActivationCache import ActivationCache

from tl_backward.errors import BridgeUnavailable

try:  # TransformerLens ≥ 3
    from transformer_lens.utilities import get_act_name, get_device
except ImportError:  # TransformerLens 2.x
    from transformer_lens.utils import get_act_name, get_device

try:  # the HookedTransformer architectures whose ln1 / ln2 follow the sublayer (OLMo-2 / 3)
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:
    POST_NORM_ARCHITECTURES = frozenset()

try:  # TransformerLens ≤ 3.x; 4.0 removed it (importing it raises ImportError)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.components import LayerNorm as HookedLayerNorm
except ImportError:
    HookedTransformer = None
    HookedTransformerConfig = None
    HookedLayerNorm = None
try:  # TransformerLens 2.2 … 3.x
    from transformer_lens.pretrained import weight_conversions
except ImportError:
    weight_conversions = None

# Decided by whether the package exists, not by catching ImportError: a broken 3.x/4.x install must
# still fail loudly here instead of passing for 2.x.
HAS_BRIDGE: bool = find_spec("transformer_lens.model_bridge") is not None

_BRIDGE_NAMES = (
    "TransformerBridge", "TransformerBridgeConfig", "ArchitectureAdapter", "AttentionBridge", "BloomAttentionBridge",
    "CodeGenAttentionBridge", "GatedMLPBridge", "JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge",
    "LinearBridge", "MoEBridge", "MoERouterBridge", "MPTALiBiAttentionBridge", "PositionEmbeddingsAttentionBridge",
    "NativeAttention", "NativeModel",
)

if HAS_BRIDGE:
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.generalized_components import (
        AttentionBridge,
        BloomAttentionBridge,
        CodeGenAttentionBridge,
        GatedMLPBridge,
        JointQKVAttentionBridge,
        JointQKVPositionEmbeddingsAttentionBridge,
        LinearBridge,
        MoEBridge,
        MoERouterBridge,
        MPTALiBiAttentionBridge,
        PositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.moe import unwrap_bridge
    from transformer_lens.model_bridge.sources.native.model import NativeAttention, NativeModel

    try:  # TransformerLens 4.x
        from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map
    except ImportError:  # TransformerLens 3.x
        from transformer_lens.model_bridge.bridge import build_alias_to_canonical_map
else:

    class _Absent(type):
        """Metaclass of the 2.x placeholders: no instances, so ``isinstance`` is False; calling the class or
        reading a public attribute (``TransformerBridge.boot_transformers``) raises :class:`BridgeUnavailable`.
        Private names stay AttributeError, so ``hasattr`` / introspection (pytest, inspect) keep working."""

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            raise BridgeUnavailable(cls.__name__)

        def __getattr__(cls, name: str) -> Any:
            if name.startswith("_"):
                raise AttributeError(name)
            raise BridgeUnavailable(f"{cls.__name__}.{name}")

    globals().update({name: _Absent(name, (), {"__module__": __name__}) for name in _BRIDGE_NAMES})

    def unwrap_bridge(module: Any) -> Any:
        """On 2.x no module is a bridge: ``module`` itself (what 3.9/4.x's ``unwrap_bridge`` returns for one)."""
        return module

    def build_alias_to_canonical_map(hook_dict: dict[str, Any], prefix: str = "") -> dict[str, str]:
        """{alias: canonical name} of the hook points in ``hook_dict`` whose key is not their ``name``, as
        3.9/4.x's function of that name computes it (a HookedTransformer's keys are its names: ``{}``)."""
        aliases: dict[str, str] = {}
        for key, value in hook_dict.items():
            full = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                aliases.update(build_alias_to_canonical_map(value, full))
            elif hasattr(value, "name") and key != value.name:
                aliases[full] = value.name
        return aliases

try:  # the HookedTransformer KV cache: TransformerLens 3.x top level, 2.x ``past_key_value_caching``
    from transformer_lens import TransformerLensKeyValueCache
except ImportError:
    try:
        from transformer_lens.past_key_value_caching import (
            HookedTransformerKeyValueCache as TransformerLensKeyValueCache,
        )
    except ImportError:  # TransformerLens 4.x: no HookedTransformer, no cache of its own
        TransformerLensKeyValueCache = None

__all__ = [
    "HAS_BRIDGE", "LAYERNORM_HOOK_AFTER_AFFINE", "POST_NORM_ARCHITECTURES", "TL_MAJOR", "TL_VERSION",
    "ActivationCache", "ArchitectureAdapter", "AttentionBridge", "BloomAttentionBridge", "CodeGenAttentionBridge",
    "GatedMLPBridge", "HookedLayerNorm", "HookedTransformer", "HookedTransformerConfig", "JointQKVAttentionBridge",
    "JointQKVPositionEmbeddingsAttentionBridge", "LinearBridge", "MPTALiBiAttentionBridge", "MoEBridge",
    "MoERouterBridge", "NativeAttention", "NativeModel", "PositionEmbeddingsAttentionBridge", "TransformerBridge",
    "TransformerBridgeConfig", "TransformerLensKeyValueCache", "build_alias_to_canonical_map", "get_act_name",
    "get_device", "is_hooked_transformer", "require_bridge", "unwrap_bridge", "weight_conversions",
]


def _tl_version() -> str:
    try:
        return version("transformer_lens")
    except PackageNotFoundError:  # imported from a source tree without metadata
        return "unknown"


# ``transformer_lens.__version__`` does not exist in 3.x; the distribution metadata does in all.
TL_VERSION: str = _tl_version()
TL_MAJOR: int = int(TL_VERSION.split(".")[0]) if TL_VERSION[:1].isdigit() else 0


# HookedTransformer's ``LayerNorm`` fires ``hook_normalized`` on its output ``x/scale · w + b`` before
# TransformerLens 3.0, on ``x/scale`` (before the gain and bias) from 3.0 on (TransformerLens PR #770).
LAYERNORM_HOOK_AFTER_AFFINE: bool = TL_MAJOR == 2


def is_hooked_transformer(model: object) -> bool:
    """True for a ``transformer_lens.HookedTransformer`` (always False on TransformerLens 4.x)."""
    return HookedTransformer is not None and isinstance(model, HookedTransformer)


def require_bridge(what: str, argument: str | None = None) -> None:
    """Raise :class:`BridgeUnavailable` for ``what`` where TransformerLens has no ``TransformerBridge`` (2.x)."""
    if not HAS_BRIDGE:
        raise BridgeUnavailable(what, argument=argument)
