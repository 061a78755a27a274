"""Facts about TransformerLens bridge classes that tl_backward dispatches on (``isinstance`` on
TransformerLens's own classes, never on names): bridges whose forward cannot run, and the
post-unembedding transform an architecture applies to its logits, the MLP width of the weights, and
the norm hook points TransformerLens fires in a flattened layout.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from tl_backward.errors import TLBackwardError

from .compat import ArchitectureAdapter, CodeGenAttentionBridge


def check_runnable(model: Any) -> None:
    """Refuse bridges whose own TransformerLens forward pass cannot run with the installed transformers,
    naming the TransformerLens problem (instead of a deep AttributeError from inside the bridge)."""
    blocks = getattr(model, "blocks", None)
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    if isinstance(attn, CodeGenAttentionBridge) and not hasattr(attn.original_component, "embed_positions"):
        raise TLBackwardError(
            "TransformerLens's CodeGenAttentionBridge (transformer_lens/model_bridge/generalized_components/"
            "codegen_attention.py) reads CodeGenAttention.embed_positions, which transformers 5.x no longer has, "
            "so the bridge's own forward pass crashes before tl_backward can run; use a transformers 4.x "
            "environment for CodeGen or wait for a TransformerLens fix", argument="model")


def logits_transform(model: Any) -> Callable[[Tensor], Tensor] | None:
    """The elementwise transform the bridge applies after ``ln_final → W_U + b_U``: its TransformerLens
    architecture adapter's ``apply_output_logits_transform`` (Cohere's logit_scale, Granite's
    1/logits_scaling, a final soft-cap), or None when the architecture declares nothing beyond an
    unset soft-cap. Increasing in every logit, so ranks are unchanged and probabilities are not."""
    arch = getattr(model, "adapter", None)
    if not isinstance(arch, ArchitectureAdapter):
        return None
    overridden = type(arch).apply_output_logits_transform is not ArchitectureAdapter.apply_output_logits_transform
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return arch.apply_output_logits_transform if overridden or cap not in (None, -1, -1.0, 0, 0.0) else None


def flattened_norm_hooks(hook_dict: dict[str, Any]) -> frozenset[str]:
    """Norm hook points that fire ``[batch·pos, …]`` where their siblings fire ``[batch, pos, …]``.

    OPT's decoder layer flattens the hidden states to ``[batch·pos, d]`` around ``final_layer_norm``
    and the MLP (transformers modeling_opt.py); TransformerLens reshapes ``hook_in``/``hook_out`` of
    that norm back (a ``hook_conversion`` on them) but not its ``hook_normalized``/``hook_scale``.
    Those two, wherever the norm's ``hook_in`` has a conversion and they have none, are listed here;
    tl_backward/core/capture.py views their tensors back to ``[batch, pos, …]``."""
    flat = set()
    for name, hp in hook_dict.items():
        prefix, _, leaf = name.rpartition(".")
        sibling = hook_dict.get(f"{prefix}.hook_in")
        if leaf in ("hook_normalized", "hook_scale") and hp.hook_conversion is None and \
                sibling is not None and sibling.hook_conversion is not None:
            flat.add(name)
    return frozenset(flat)


def d_mlp(model: Any) -> int:
    """The MLP width, from the first dense MLP's ``W_out [d_mlp, d_model]``: TransformerLens's
    ``cfg.d_mlp`` can disagree with the weights (OPT: 4·d_model whatever ``ffn_dim`` is). ``cfg.d_mlp``
    when no layer has a dense MLP (mixtures of experts)."""
    for block in model.blocks:
        try:
            w_out = block.mlp.W_out
        except AttributeError:
            continue
        if isinstance(w_out, Tensor) and w_out.dim() == 2:
            return int(w_out.shape[0])
    return int(model.cfg.d_mlp)
