"""The TransformerBridge backend, and :func:`get_adapter`, which picks a backend per model class.

Everything else in tl_backward asks :func:`get_adapter` instead of poking at model internals,
so family differences live in the backends (:class:`BridgeAdapter` here,
:class:`tl_backward.core.hooked.HookedAdapter` for ``HookedTransformer``) and, for attention (RA
routes, scales, soft-capping), in :mod:`tl_backward.core.attention_kinds`.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import bridges
from .adapter_base import HOOKS, ModelAdapter, readout_input
from .attention_kinds import PatternRoute, ValueRoute, attention_route, attention_scale
from .compat import (
    HAS_BRIDGE,
    TL_VERSION,
    PositionEmbeddingsAttentionBridge,
    TransformerBridge,
    is_hooked_transformer,
)
from .hooked import HookedAdapter
from .moe import MoELayer, moe_layer
from .tokens import decode_ids

__all__ = ["BridgeAdapter", "HookedAdapter", "ModelAdapter", "apply_rotary", "decode_ids", "get_adapter",
           "readout_input"]


class BridgeAdapter(ModelAdapter):
    """:class:`ModelAdapter` of a reconstructing ``TransformerBridge`` (any family TransformerLens boots
    from Hugging Face; see README's support matrix) or a ``boot_native`` bridge."""

    def __init__(self, model: Any):
        bridges.check_runnable(model)
        _check_supported(model)
        super().__init__(model)
        self.d_mlp = bridges.d_mlp(model)  # from the weights: OPT's cfg.d_mlp disagrees with them
        self.rotary = "blocks.0.attn.hook_cos" in self._hook_names
        # Only this bridge fires hook_rot_q/k; GPT-NeoX's rotates inside without the hook
        # (rotate q/k yourself with apply_rotary and the hook_cos/hook_sin tensors).
        self.rot_hooks = isinstance(model.blocks[0].attn, PositionEmbeddingsAttentionBridge)
        # How Reversed Attention is read per layer (core/attention_kinds.py): on-path score hook,
        # on-path pattern hook (boot_native), z = P·V, or refused with a reason (RA / patching refuse
        # per feature through ra_route; the model itself is adapted).
        self.routes = tuple(attention_route(block.attn, self.n_heads) for block in model.blocks)
        self.flattened_hooks = bridges.flattened_norm_hooks(model.hook_dict)
        value_layers = [l for l, r in enumerate(self.routes) if isinstance(r, ValueRoute)]
        self.values_only_hooks = frozenset(HOOKS["pattern"].format(l=l) for l in value_layers)
        self.misfired_hooks = {
            HOOKS["attn_scores"].format(l=l): r.misfired_scores for l, r in enumerate(self.routes)
            if isinstance(r, (ValueRoute, PatternRoute))}

    def attn_scale(self, layer: int) -> float:
        """s such that ``attn_scores = q·kᵀ / s`` (before mask and soft-cap) at ``layer``.

        ``cfg.attn_scale`` reads -1 on bridges; the HF module's own constant is used
        (:func:`tl_backward.core.attention_kinds.attention_scale`: ``scaling``, MPT's
        ``softmax_scale``, BLOOM's ``inv_norm_factor``, GPT-Neo's 1). Checked against the bridge's
        real scores and HF autograd in the tests.
        """
        layer = self.check_layer(layer)
        return attention_scale(self.model.blocks[layer].attn, layer, self.d_head)

    def linear(self, layer: int, module: str):
        """The bridged linear module: ``module`` in {q, k, v, o, mlp_in, mlp_gate, mlp_out}.

        Its ``hook_in`` carries the factor x and its ``hook_out`` the factor δ (Backward Lens).
        """
        table = {
            "q": lambda: self._attn(layer).q,
            "k": lambda: self._attn(layer).k,
            "v": lambda: self._attn(layer).v,
            "o": lambda: self._attn(layer).o,
            "mlp_in": lambda: getattr(self._mlp(layer), "in"),
            "mlp_gate": lambda: self._mlp(layer).gate,
            "mlp_out": lambda: self._mlp(layer).out,
        }
        if module not in table:
            raise TLBackwardError(f"module must be one of {sorted(table)}, got {module!r}", argument="module")
        if module.startswith("mlp_") and self.moe(layer) is not None:
            raise TLBackwardError(
                f"layer {layer}'s MLP is a mixture of experts: {module} is a batched matrix per expert with no bridged "
                "linear module (its 'gate' child is the router); read its factors with "
                "tl_backward.lens.gradient_factors (an expert axis) or adapter.moe(layer)", argument="module")
        if module == "mlp_gate" and not self.gated_mlp:
            raise TLBackwardError("mlp_gate exists only for gated MLPs (Llama-style); this MLP is not gated",
                                  argument="module")
        return table[module]()

    def _moe_layer(self, layer: int) -> MoELayer | None:
        return moe_layer(self._mlp(layer), layer)

    @property
    def logits_transform(self):
        """The model's post-unembedding transform, or None (:func:`tl_backward.core.bridges.logits_transform`)."""
        return bridges.logits_transform(self.model)

def apply_rotary(x: Float[Tensor, "batch pos head d_head"], cos: Float[Tensor, "batch pos rot"],
                 sin: Float[Tensor, "batch pos rot"]) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``rot`` dims of q or k as the HF models do (``rotate_half`` convention):
    ``x_r·cos + rotate_half(x_r)·sin``, the remaining dims pass through (GPT-NeoX partial rotary).
    """
    rot = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def _check_supported(model: Any) -> None:
    if not HAS_BRIDGE:  # TransformerLens 2.x: HookedTransformer is the one model class
        raise TLBackwardError(
            f"model must be a transformer_lens HookedTransformer (TransformerLens {TL_VERSION} has no "
            f"TransformerBridge), got {type(model).__name__}; load one with "
            "tl_backward.load_model(..., backend='hooked') or HookedTransformer.from_pretrained(...)",
            argument="model")
    if not isinstance(model, TransformerBridge):
        raise TLBackwardError(
            f"model must be a transformer_lens TransformerBridge (or, with TransformerLens < 4, a HookedTransformer), "
            f"got {type(model).__name__}; load one with tl_backward.load_model(...) or "
            "TransformerBridge.boot_transformers(...)",
            argument="model")
    if not isinstance(getattr(model, "original_model", None), torch.nn.Module):
        raise TLBackwardError(
            "this bridge does not wrap a local torch module (remote or inference-only driver): "
            "tl_backward needs autograd through the model", argument="model")


_ADAPTERS: "weakref.WeakKeyDictionary[Any, ModelAdapter]" = weakref.WeakKeyDictionary()


def get_adapter(model: Any) -> ModelAdapter:
    """The (cached) :class:`ModelAdapter` of ``model``; raises for unsupported models."""
    if isinstance(model, ModelAdapter):
        return model
    try:
        return _ADAPTERS[model]
    except (KeyError, TypeError):
        pass
    adapter = HookedAdapter(model) if is_hooked_transformer(model) else BridgeAdapter(model)
    _ADAPTERS[model] = adapter
    return adapter

