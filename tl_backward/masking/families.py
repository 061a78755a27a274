"""Per-family knowledge of how a Hugging Face model takes the MAS mask.

The segment keep-mask ``keep[b, 0, i, j]`` (True = query i may attend to key j, :mod:`.rule`) has to
reach every attention layer in the form that layer reads, dispatched with ``isinstance`` on
TransformerLens / transformers classes:

* **Sliding windows.** The MAS rule only lifts causality; it does not lift a layer's own window.
  On a layer with window W (``config.sliding_window`` on the layers whose ``config.layer_types``
  entry is ``"sliding_attention"``, or on every layer when the config has no ``layer_types``) the
  mask is ``keep ∧ (j > i − W)`` on column indices -- the ``sliding_window_overlay`` that
  transformers ANDs onto its own causal mask (``transformers/masking_utils.py``; Gemma-3's
  bidirectional image blocks use the same ``(causal ∨ block) ∧ window`` composition). Cached
  decoding then agrees with the prefill: HF re-applies the window to every causal decode step and
  its sliding-window cache keeps exactly the last W − 1 keys. Layers with different windows get a
  ``{layer_type: mask}`` dict, which transformers 5 models with ``layer_types`` accept as their
  ``causal_mask_mapping``.
* **Mask format.** Bridges that recompute attention (``JointQKVAttentionBridge``,
  ``PositionEmbeddingsAttentionBridge`` and subclasses) read a bool keep-mask; an adapter with
  ``bool_4d_mask_is_keep = False`` (MPT: ``masked_fill(mask, min)``) gets the complement; the
  generic delegating ``AttentionBridge`` hands the mask to HF's own attention, which *adds* it
  (GPT-J ``_attn``, OPT ``eager_attention_forward``), so it gets an additive ``0 / finfo.min`` mask.
* **Refused:** BLOOM (ALiBi built from a 2-D mask), GPT-Neo (its ``_attn`` ANDs every mask with
  the built-in causal/local ``bias`` buffer, so no mask can lift causality).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

from ..core.compat import (
    AttentionBridge,
    BloomAttentionBridge,
    JointQKVAttentionBridge,
    MPTALiBiAttentionBridge,
    PositionEmbeddingsAttentionBridge,
)
from ..core.device import param_dtype
from ..errors import TLBackwardError

# Bridges that compute softmax(scores + mask) themselves and read a bool keep-mask.
RECONSTRUCTING = (JointQKVAttentionBridge, PositionEmbeddingsAttentionBridge)


def _first_attn(model: Any) -> Any:
    blocks = getattr(model, "blocks", None)
    return getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None


def check_family(model: Any) -> None:
    """Refuse the families whose HF attention cannot take a 4-D segment mask (BLOOM, GPT-Neo)."""
    attn = _first_attn(model)
    if isinstance(attn, BloomAttentionBridge):
        raise TLBackwardError(
            "MAS is not available for BLOOM: transformers' BloomModel builds its ALiBi bias from a 2-D "
            "[batch, pos] padding mask (build_alibi_tensor) and cannot take the 4-D segment mask", argument="model")
    if isinstance(getattr(attn, "original_component", None), GPTNeoSelfAttention):
        raise TLBackwardError(
            "MAS is not available for GPT-Neo: transformers' GPTNeoSelfAttention._attn applies its built-in "
            "causal (and local-window) `bias` buffer before adding any attention_mask, so a segment mask "
            "cannot lift causality there", argument="model")


def layer_windows(config: Any) -> list[int | None]:
    """Sliding window W of each layer (None = full attention), as the HF model applies it."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window:
        return [None] * n
    if types is None:
        return [int(window)] * n
    return [int(window) if t == "sliding_attention" else None for t in types]


def windowed(keep: Bool[Tensor, "batch 1 query_pos key_pos"], window: int | None,
             ) -> Bool[Tensor, "batch 1 query_pos key_pos"]:
    """``keep ∧ (j > i − W)`` with i the absolute column of the query (queries are the last rows)."""
    if window is None:
        return keep
    q_len, k_len = keep.shape[-2:]
    rows = torch.arange(k_len - q_len, k_len, device=keep.device)[:, None]
    cols = torch.arange(k_len, device=keep.device)[None, :]
    return keep & (cols > rows - window)


def _bool_mask_is_keep(model: Any, attn: Any) -> bool:
    """The architecture adapter's ``bool_4d_mask_is_keep`` (TransformerLens 4.x). TransformerLens 3.9 has no
    such flag, yet its MPT bridge already blocks where the bool mask is True (``masked_fill(mask, min)`` in
    ``generalized_components/mpt_alibi_attention.py``): there the bridge class decides."""
    flag = getattr(getattr(model, "adapter", None), "bool_4d_mask_is_keep", None)
    return not isinstance(attn, MPTALiBiAttentionBridge) if flag is None else bool(flag)


def _format(model: Any, keep: Tensor, dtype: torch.dtype) -> Tensor:
    attn = _first_attn(model)
    if not _bool_mask_is_keep(model, attn):
        return ~keep
    if isinstance(attn, AttentionBridge) and not isinstance(attn, RECONSTRUCTING):
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
    return keep


def hf_attention_mask(model: Any, keep: Bool[Tensor, "batch 1 query_pos key_pos"]) -> Tensor | dict[str, Tensor]:
    """The ``attention_mask`` the wrapped HF model must receive for the keep-mask ``keep``: windowed
    per layer, in the format its attention reads (module docstring)."""
    hf = model.original_model
    dtype = param_dtype(hf)
    windows = layer_windows(hf.config)
    if len(set(windows)) <= 1:
        return _format(model, windowed(keep, windows[0] if windows else None), dtype)
    types = list(hf.config.layer_types)
    return {t: _format(model, windowed(keep, w), dtype) for t, w in dict(zip(types, windows)).items()}


@contextmanager
def hf_mask(model: Any, keep: Bool[Tensor, "batch 1 query_pos key_pos"],
            position_ids: Int[Tensor, "batch pos"] | None) -> Iterator[None]:
    """While open, every call of the wrapped HF model gets :func:`hf_attention_mask` of ``keep``
    (and ``position_ids`` if given), whatever the Bridge passed; the hook is removed on exit."""
    mask = hf_attention_mask(model, keep)

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return args, kwargs

    handle = model.original_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_masked(model: Any, tokens: Int[Tensor, "batch pos"], keep: Bool[Tensor, "batch 1 query_pos key_pos"],
               position_ids: Int[Tensor, "batch pos"], **kwargs: Any) -> Any:
    """``model(tokens, attention_mask=keep, position_ids=..., **kwargs)`` with the HF model receiving
    :func:`hf_attention_mask` of ``keep`` (windowed, family format)."""
    with hf_mask(model, keep, position_ids):
        return model(tokens, attention_mask=keep, position_ids=position_ids, **kwargs)
