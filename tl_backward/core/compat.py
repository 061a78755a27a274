"""Every TransformerLens name tl_backward uses, resolved once for the installed TransformerLens.

Supported: TransformerLens 3.9 … 4.x (``pyproject.toml``). What moved between them, checked by
importing each name in a 3.9.0 and a 4.3.0 venv:

============================================  ==========================================  =====================
name                                          3.9                                          4.x
============================================  ==========================================  =====================
``TransformerBridge``                         ``transformer_lens.model_bridge`` only       also top level
``build_alias_to_canonical_map``              ``transformer_lens.model_bridge.bridge``     ``….bridge_core``
``HookedTransformer`` / ``…Config``           top level                                    removed (None here)
``pretrained.weight_conversions``             HF → HookedTransformer state dicts           None here
``TransformerLensKeyValueCache``              top level (HookedTransformer's KV cache)    top level
============================================  ==========================================  =====================

Everything else (the attention/MoE bridge classes, ``ArchitectureAdapter``, ``NativeModel``,
``ActivationCache``, ``get_act_name``, ``get_device``) sits at the same path in both.
TransformerLens 2.x has no ``model_bridge`` at all, so it is not supported yet (docs: README).

:data:`HookedTransformer` is None on TransformerLens 4.x, where the class was removed; the
HookedTransformer backend (:mod:`tl_backward.core.hooked`) is then never selected.
``tl_backward.zoo`` (a layer below core) imports ``transformer_lens.model_bridge.TransformerBridge``
itself, the one path valid in every supported version.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from transformer_lens.ActivationCache import ActivationCache
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
from transformer_lens.utilities import get_act_name, get_device

try:  # TransformerLens 4.x
    from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map
except ImportError:  # TransformerLens 3.x
    from transformer_lens.model_bridge.bridge import build_alias_to_canonical_map

try:  # the HookedTransformer architectures whose ln1 / ln2 follow the sublayer (OLMo-2 / 3)
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
except ImportError:
    POST_NORM_ARCHITECTURES = frozenset()

try:  # TransformerLens ≤ 3.x; 4.0 removed it (importing it raises ImportError)
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions
except ImportError:
    HookedTransformer = None
    HookedTransformerConfig = None
    weight_conversions = None

try:  # the HookedTransformer KV cache (``cache/key_value_cache.py``); older releases named it otherwise
    from transformer_lens import TransformerLensKeyValueCache
except ImportError:
    TransformerLensKeyValueCache = None

__all__ = [
    "TL_MAJOR", "TL_VERSION", "ActivationCache", "ArchitectureAdapter", "AttentionBridge", "BloomAttentionBridge",
    "CodeGenAttentionBridge", "GatedMLPBridge", "HookedTransformer", "HookedTransformerConfig",
    "JointQKVAttentionBridge", "JointQKVPositionEmbeddingsAttentionBridge", "LinearBridge",
    "MPTALiBiAttentionBridge", "MoEBridge", "MoERouterBridge", "NativeAttention", "NativeModel",
    "POST_NORM_ARCHITECTURES", "PositionEmbeddingsAttentionBridge", "TransformerBridge", "TransformerLensKeyValueCache",
    "build_alias_to_canonical_map", "get_act_name", "get_device", "is_hooked_transformer", "unwrap_bridge",
    "weight_conversions",
]


def _tl_version() -> str:
    try:
        return version("transformer_lens")
    except PackageNotFoundError:  # imported from a source tree without metadata
        return "unknown"


# ``transformer_lens.__version__`` does not exist in 3.x; the distribution metadata does in both.
TL_VERSION: str = _tl_version()
TL_MAJOR: int = int(TL_VERSION.split(".")[0]) if TL_VERSION[:1].isdigit() else 0


def is_hooked_transformer(model: object) -> bool:
    """True for a ``transformer_lens.HookedTransformer`` (always False on TransformerLens 4.x)."""
    return HookedTransformer is not None and isinstance(model, HookedTransformer)
