"""The TransformerBridge backend, and :func:`get_adapter`, which picks a backend per model class.

Everything else in tl_backward asks :func:`get_adapter` instead of poking at model internals,
so family differences live in the backends (:class:`BridgeAdapter` here,
:class:`tl_backward.core.hooked.HookedAdapter` for ``HookedTransformer``) and, for attention (RA
routes, scales, soft-capping), in :mod:`tl_backward.core.attention_kinds`.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import bridges
from .adapter_base import HOOKS, ModelAdapter, readout_input
from .attention_kinds import PatternRoute, Unsupported, ValueRoute, attention_route, attention_scale
from .compat import (
    HAS_BRIDGE,
    TL_VERSION,
    PositionEmbeddingsAttentionBridge,
    TransformerBridge,
    is_hooked_transformer,
)
from .device import module_device, param_dtype
from .hooked import HookedAdapter
from .moe import MoELayer, has_moe, has_shared_expert, moe_layer, refuse_moe_neurons
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
        # A nameless MLP container (TransformerLens 3.x's OPT: fc1/fc2 sit on the block) never fires its
        # own hook_in; its first linear's hook_in carries the same tensor, the MLP's input.
        mlp = getattr(model.blocks[0], "mlp", None)
        if mlp is not None and getattr(mlp, "name", "") is None and "blocks.0.mlp.in.hook_in" in self._hook_names:
            self.hooks_table = {**HOOKS, "mlp_in": "blocks.{l}.mlp.in.hook_in"}
        self.has_moe, self.has_shared_expert = has_moe(model), has_shared_expert(model)
        self.flattened_hooks = bridges.flattened_norm_hooks(model.hook_dict)
        # hook_pattern carries values only where RA is read through z = P·V, or where no gradient reaches
        # it at all (Unsupported with a forward route: TransformerLens 3.x's NativeAttention).
        value_layers = [l for l, r in enumerate(self.routes)
                        if isinstance(r, ValueRoute) or (isinstance(r, Unsupported) and r.forward is not None)]
        self.values_only_hooks = frozenset(HOOKS["pattern"].format(l=l) for l in value_layers)
        self.misfired_hooks = {
            HOOKS["attn_scores"].format(l=l): r.misfired_scores for l, r in enumerate(self.routes)
            if isinstance(r, (ValueRoute, PatternRoute)) or (isinstance(r, Unsupported) and r.misfired_scores)}

    def attn_scale(self, layer: int) -> float:
        """s such that ``attn_scores = q·kᵀ / s`` (before mask and soft-cap) at ``layer``.

        ``cfg.attn_scale`` reads -1 on bridges; the HF module's own constant is used
        (:func:`tl_backward.core.attention_kinds.attention_scale`: ``scaling``, MPT's
        ``softmax_scale``, BLOOM's ``inv_norm_factor``, GPT-Neo's 1). Checked against the bridge's
        real scores and HF autograd in the tests.
        """
        layer = self.check_layer(layer)
        return attention_scale(self.model.blocks[layer].attn, layer, self.d_head)

    def rotary_tables(self, layer: int, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`ModelAdapter.rotary_tables`, from the HF ``*RotaryEmbedding`` module called directly
        (GPT-NeoX's bridge does not fire hook_rot_q/k, and hook_cos/sin carry no gradient): one table for
        every layer; rotary embeddings that differ by layer type (Gemma-3's local / global) are refused."""
        self.check_layer(layer)
        for mod in self.model.original_model.modules():
            name = type(mod).__name__
            if name.endswith("RotaryEmbedding") and "Bridge" not in name:
                if "layer_type" in inspect.signature(mod.forward).parameters:
                    raise TLBackwardError(
                        f"this model's rotary embedding ({name}) differs by layer type (local and global RoPE, "
                        "e.g. Gemma-3), but flow graphs read one cos/sin table for every layer: not supported",
                        argument="model")
                x = torch.zeros(1, n_pos, self.d_model, dtype=param_dtype(self.model), device=module_device(mod))
                with torch.no_grad():
                    cos, sin = mod(x, torch.arange(n_pos, device=x.device)[None])
                return cos[0].float().cpu(), sin[0].float().cpu()
        raise TLBackwardError("this rotary model has no HF *RotaryEmbedding module to read cos/sin from",
                              argument="model")

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

    def require_dense_mlp(self, layers: Sequence[int], feature: str) -> None:
        """As :meth:`ModelAdapter.require_dense_mlp`; mixture-of-experts layers are refused too
        (:func:`tl_backward.core.moe.refuse_moe_neurons`)."""
        super().require_dense_mlp(layers, feature)
        refuse_moe_neurons(self.model, list(layers), feature)

    def mlp_out_weight(self, layer: int) -> tuple[torch.Tensor, bool]:
        """As :meth:`ModelAdapter.mlp_out_weight`: the weight of the HF module the bridge wraps, its layout
        decided by the module's class and never by shape (with ``d_mlp == d_model`` both orientations fit):
        ``torch.nn.Linear`` stores ``[out, in]``, transformers' ``Conv1D`` (GPT-2) ``[in, out]``; other
        classes and non-float (quantised) weights are refused."""
        module = self.linear(layer, "mlp_out").original_component
        # A model built from Conv1D modules has imported transformers.pytorch_utils already; looking it
        # up there keeps `import tl_backward` free of a transformers import.
        hf_utils = sys.modules.get("transformers.pytorch_utils")
        if isinstance(module, torch.nn.Linear):
            out_in, shape = True, (self.d_model, self.d_mlp)
        elif hf_utils is not None and isinstance(module, hf_utils.Conv1D):
            out_in, shape = False, (self.d_mlp, self.d_model)
        else:
            raise TLBackwardError(
                f"this model's MLP out-projection is a {type(module).__name__}, whose weight layout "
                "forward_pass_shift does not know; it edits torch.nn.Linear ([out, in]) and transformers' "
                "Conv1D ([in, out]) out-projections", argument="model")
        return _plain_weight(getattr(module, "weight", None), shape, type(module).__name__), out_in

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


def _plain_weight(weight: Any, shape: tuple[int, int], what: str) -> torch.Tensor:
    """``weight`` if it is a floating-point tensor of ``shape``, else a ``TLBackwardError``."""
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape or not weight.is_floating_point():
        raise TLBackwardError(
            f"the MLP out-projection's weight is {getattr(weight, 'dtype', None)} "
            f"{tuple(getattr(weight, 'shape', ()))}, expected a floating-point {shape} for {what}; "
            "forward_pass_shift edits plain (unquantised) weights", argument="model")
    return weight


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

