"""An HF causal LM as a ``HookedTransformer`` (TransformerLens < 4), raw: no weight processing.

The weights are converted by TransformerLens's own ``transformer_lens.pretrained.weight_conversions``
(``convert_gpt2_weights``, ``convert_llama_weights``, ``convert_neox_weights``) and loaded with ``fold_ln``,
``center_writing_weights``, ``center_unembed`` and ``fold_value_biases`` all off, so the model holds the
HF parametrisation (factors are gradients of the HF matrices in TransformerLens layout). The
``HookedTransformerConfig`` is written here from the HF config, following TransformerLens 3.9's
``loading_from_pretrained.convert_hf_model_config`` for the architecture, because that function needs
an official model name (or reads ``GPT2Config.n_ctx``, which transformers 5 no longer has). Checked
against the HF model's logits in tests/core/test_hooked_loading.py.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from tl_backward.errors import TLBackwardError

from .compat import TL_VERSION, HookedTransformer, HookedTransformerConfig, weight_conversions

__all__ = ["CONVERSIONS", "hooked_from_hf", "require_hooked"]


def _gpt2_config(c: Any) -> dict[str, Any]:
    return dict(d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
                n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
                act_fn=c.activation_function, use_attn_scale=getattr(c, "scale_attn_weights", True),
                scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, normalization_type="LN",
                original_architecture="GPT2LMHeadModel")


def _llama_config(c: Any) -> dict[str, Any]:
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TLBackwardError(f"backend='hooked': rope_type {rope.get('rope_type')!r} is not converted; use "
                              "backend='bridge'", argument="backend")
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None
    return dict(d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
                n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
                d_vocab=c.vocab_size, act_fn=c.hidden_act, n_key_value_heads=kv, normalization_type="RMS",
                positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d_head,
                rotary_base=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))), final_rms=True,
                gated_mlp=True, original_architecture="LlamaForCausalLM")


def _neox_config(c: Any) -> dict[str, Any]:
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise TLBackwardError(f"backend='hooked': rope_type {rope.get('rope_type')!r} is not converted; use "
                              "backend='bridge'", argument="backend")
    d_head = c.hidden_size // c.num_attention_heads
    pct = rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0))
    return dict(d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
                n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps,
                d_vocab=c.vocab_size, act_fn=c.hidden_act, parallel_attn_mlp=c.use_parallel_residual,
                positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=round(pct * d_head),
                rotary_base=float(rope.get("rope_theta", getattr(c, "rotary_emb_base", 10000.0))),
                normalization_type="LN", original_architecture="GPTNeoXForCausalLM")


# (HF module, HF class, config writer, TransformerLens conversion): isinstance dispatch on the HF class, looked
# up in sys.modules (a model of the class has imported its module), so importing tl_backward imports no model code.
CONVERSIONS: tuple[tuple[str, str, Callable[[Any], dict], str], ...] = (
    ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel", _gpt2_config, "convert_gpt2_weights"),
    ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", _llama_config, "convert_llama_weights"),
    ("transformers.models.gpt_neox.modeling_gpt_neox", "GPTNeoXForCausalLM", _neox_config, "convert_neox_weights"),
)


def require_hooked(argument: str = "backend") -> None:
    """Refuse the HookedTransformer backend where TransformerLens has no HookedTransformer."""
    if HookedTransformer is None:
        raise TLBackwardError(f"backend='hooked' needs TransformerLens < 4 (installed: {TL_VERSION}, which removed "
                              "HookedTransformer): pip install 'transformer_lens<4', or use backend='bridge'",
                              argument=argument)
    if weight_conversions is None:  # TransformerLens 2.0 / 2.1, below the declared range
        raise TLBackwardError(f"backend='hooked' converts weights with transformer_lens.pretrained.weight_conversions, "
                              f"which TransformerLens {TL_VERSION} does not have: pip install 'transformer_lens>=2.2'",
                              argument=argument)


def hooked_from_hf(hf: torch.nn.Module, tokenizer: Any, label: str, device: torch.device,
                   dtype: torch.dtype) -> Any:
    """``hf`` converted into a raw ``HookedTransformer`` on ``device`` in ``dtype`` (module docstring)."""
    require_hooked()
    for module, cls_name, write_config, convert in CONVERSIONS:
        cls = getattr(sys.modules.get(module), cls_name, None)
        if cls is not None and isinstance(hf, cls):
            cfg = HookedTransformerConfig(**write_config(hf.config), model_name=label, dtype=dtype, device=str(device))
            model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
            model.load_and_process_state_dict(getattr(weight_conversions, convert)(hf, cfg), fold_ln=False,
                                              center_writing_weights=False, center_unembed=False,
                                              fold_value_biases=False, refactor_factored_attn_matrices=False)
            return model.to(device, print_details=False).eval()
    names = ", ".join(c for _, c, _, _ in CONVERSIONS)
    raise TLBackwardError(f"name {label!r}: backend='hooked' converts {names} models; this is a "
                          f"{type(hf).__name__}: use backend='bridge'", argument="backend")
