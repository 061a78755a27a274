"""The HookedTransformer backend (TransformerLens < 4): its native hook points and parameters.

Read from TransformerLens 3.9's source (``components/abstract_attention.py``,
``grouped_query_attention.py``, ``transformer_block.py``, ``layer_norm*.py``, ``rms_norm*.py``,
``mlps/mlp.py``, ``mlps/gated_mlp.py``, ``HookedTransformer.py``) and checked in
tests/core/test_hooked.py against autograd on the model's own activations and parameters:

* **Attention.** ``S = softcap(q·kᵀ / s)`` (``s`` = the module's ``attn_scale``: √d_head or
  ``cfg.attn_scale``, ×(layer+1) under ``scale_attn_by_inverse_layer_idx``), then ALiBi, then
  ``apply_causal_mask`` (masked entries set to ``-inf``), then ``hook_attn_scores``, then the softmax
  and ``hook_pattern``, and ``z = pattern · V`` at ``hook_z``. So ``hook_attn_scores`` is on the autograd
  path *after* the mask: every layer is a :class:`~tl_backward.core.attention_kinds.ScoreRoute`,
  ``RA = ∂L/∂S / s`` (× ``1 − (S/c)²`` under ``attn_scores_soft_cap`` c) and exactly 0 at masked
  entries (the softmax's backward multiplies by ``pattern = 0`` there; ALiBi adds a constant, which
  does not change ∂L/∂S). An edit of ``hook_pattern`` (patching) is what ``z`` reads.
* **ln1 runs three times** per block (on the query, key and value inputs), so ``ln1.hook_scale`` and
  ``ln1.hook_normalized`` fire thrice on one value; :func:`tl_backward.capture` sums the three
  backward firings (``summed_grad_hooks``), the gradient at the hook point as a whole.
* **Readout.** ``unembed.hook_in`` (TransformerLens 3.9's ``components/unembed.py`` fires ``hook_in`` /
  ``hook_out``) is the input of ``W_U`` after ``ln_final``: the adapter's ``readout_input``, where
  :func:`tl_backward.core.stream.stream` gathers the positions a metric reads.
* **Residual.** ``hook_resid_mid`` is a real hook on ``resid_pre + attn_out`` (no alias): its
  gradient is the full residual gradient, as tl_backward reports on the bridge.
* **Weights** are the parameters the model holds: ``W_Q [head, d_model, d_head]``,
  ``W_K``/``W_V [kv_head, d_model, d_head]`` (``_W_K``/``_W_V`` under GQA), ``W_in``/``W_gate``,
  ``W_out``. A model loaded with ``fold_ln`` / ``center_writing_weights`` / ``center_unembed`` holds
  *processed* weights (LayerNorm gains folded into ``W_Q``/``W_in``, writing weights centred), so its
  factors are the gradients of those, not of the Hugging Face parameters.
* **Factor inputs.** No hook carries the input of ``W_Q`` or ``W_in`` itself: ``ln1``/``ln2``'s
  ``hook_normalized`` fires before the gain and bias. The adapter declares the derived points
  ``blocks.{l}.ln1.hook_out`` / ``ln2.hook_out`` = ``hook_normalized · w (+ b)`` (the very tensor
  the attention / MLP reads; ``resid_pre``/``resid_mid`` without normalisation), which
  :func:`tl_backward.capture` computes from the captured ``hook_normalized``. They carry values only.
  (TransformerLens 2.x's ``LayerNorm`` fires ``hook_normalized`` after its gain and bias, so there
  ``ln1.hook_out`` is ``hook_normalized`` itself: ``compat.LAYERNORM_HOOK_AFTER_AFFINE``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.errors import TLBackwardError

from .adapter_base import HOOKS, ModelAdapter
from .attention_kinds import ScoreRoute
from .compat import LAYERNORM_HOOK_AFTER_AFFINE, HookedLayerNorm
from .device import module_device, on, param_dtype

__all__ = ["HOOKED_HOOKS", "HookedAdapter"]

# kind -> HookedTransformer hook name: the legacy names, except where no such hook exists.
HOOKED_HOOKS = {**HOOKS, "attn_in": "blocks.{l}.ln1.hook_out", "mlp_in": "blocks.{l}.ln2.hook_out"}
_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


@dataclass(frozen=True)
class HookRef:
    """A hook point by name (what ``ModelAdapter.linear`` hands out as ``hook_in`` / ``hook_out``)."""

    name: str


@dataclass(frozen=True)
class LinearHooks:
    """The hook points of one weight matrix: ``hook_in`` carries its input x, ``hook_out`` the output z
    whose gradient is δ, so ``∂L/∂W = Σ_i x_i ⊗ δ_i``."""

    hook_in: HookRef
    hook_out: HookRef

    def __getattr__(self, name: str) -> Any:
        """Bridge-only attributes (``original_component``, ``weight``, …) are refused with the fix."""
        if name.startswith("__"):
            raise AttributeError(name)
        raise TLBackwardError(
            f"this feature reads the bridged linear module's {name!r}, which a HookedTransformer does not have: "
            "forward_pass_shift needs a TransformerBridge for now (TransformerBridge.boot_transformers(...))",
            argument="model")


class HookedAdapter(ModelAdapter):
    """:class:`~tl_backward.core.adapter_base.ModelAdapter` of a ``transformer_lens.HookedTransformer``
    (see the module docstring for what was read where)."""

    hooks_table = HOOKED_HOOKS

    def __init__(self, model: Any):
        super().__init__(model)
        cfg = model.cfg
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.rot_hooks = self.rotary  # HookedTransformer fires hook_rot_q / hook_rot_k itself
        cap = getattr(cfg, "attn_scores_soft_cap", None)
        softcap = float(cap) if cap is not None and cap > 0 else None
        self.routes = tuple(ScoreRoute(softcap=softcap) for _ in range(self.n_layers))
        self.derived_hooks: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {}
        for l in range(self.n_layers):
            self.derived_hooks[HOOKED_HOOKS["attn_in"].format(l=l)] = self._norm_output(l, "ln1", "resid_pre")
            if not cfg.attn_only:
                skip = "resid_pre" if self.parallel_blocks else "resid_mid"
                self.derived_hooks[HOOKED_HOOKS["mlp_in"].format(l=l)] = self._norm_output(l, "ln2", skip)
        self.values_only_hooks = frozenset(self.derived_hooks)
        # TransformerBlock calls ln1 three times (query, key and value inputs, transformer_block.py): its
        # hooks fire thrice on one value, each backward firing carrying one path's share of the gradient.
        norms = cfg.normalization_type in _NORMS
        self.summed_grad_hooks = frozenset(
            f"blocks.{l}.ln1.{h}" for l in range(self.n_layers) for h in ("hook_scale", "hook_normalized") if norms)

    def _norm_output(self, layer: int, ln: str, unnormed: str) -> tuple[str, Callable[[Tensor], Tensor]]:
        """(source hook, map) giving the output of ``blocks.{layer}.{ln}``: ``hook_normalized · w + b``."""
        norm = self.model.cfg.normalization_type
        if norm not in _NORMS:  # ln1/ln2 are nn.Identity: the block reads the residual itself
            return HOOKS[unnormed].format(l=layer), _identity
        block = self.model.blocks[layer]

        def apply(normalized: Tensor) -> Tensor:
            # Read at call time: process_weights_ (fold_ln) swaps LN for LNPre, which has no w / b.
            module = getattr(block, ln)
            if LAYERNORM_HOOK_AFTER_AFFINE and isinstance(module, HookedLayerNorm):
                return normalized  # TransformerLens 2.x: hook_normalized already is x/scale · w + b
            w, b = getattr(module, "w", None), getattr(module, "b", None)
            out = normalized if w is None else normalized * on(w.detach().float(), normalized)
            return out if b is None else out + on(b.detach().float(), normalized)
        return f"blocks.{layer}.{ln}.hook_normalized", apply

    # ---------------------------------------------------------------- names
    def hook_name(self, kind: str, layer: int) -> str:
        """As :meth:`ModelAdapter.hook_name`; ``attn_in`` / ``mlp_in`` are the derived, values-only points
        of the module docstring, and ``cos`` / ``sin`` do not exist (HookedTransformer rotates q and k
        with its own buffers and fires ``hook_rot_q`` / ``hook_rot_k``)."""
        if kind in ("cos", "sin"):
            raise TLBackwardError(f"HookedTransformer has no hook_{kind}: capture rot_q / rot_k (the rotated q, k)",
                                  argument="kind")
        if kind == "mlp_in" and self.model.cfg.attn_only:
            raise TLBackwardError("this HookedTransformer is attention-only: it has no MLP", argument="kind")
        return super().hook_name(kind, layer)

    def check_model(self) -> None:
        """Refuse a model whose ``hook_dict`` names hook points that are no longer in it: TransformerLens
        2.x's ``process_weights_`` swaps in LayerNormPre / RMSNormPre modules without re-registering their
        hooks, so ``hook_dict`` still holds the discarded modules' (which never fire)."""
        present = {id(m) for m in self.model.modules()}
        stale = [name for name, hp in self.model.hook_dict.items() if id(hp) not in present]
        if stale:
            raise TLBackwardError(f"this HookedTransformer's hook_dict holds {len(stale)} hook points that are no "
                                  f"longer in the model (e.g. {stale[0]!r}: process_weights_ replaced the module "
                                  "without re-registering its hooks, as TransformerLens 2.x does): call model.setup()",
                                  argument="model")

    # ---------------------------------------------------------------- attention
    def attn_scale(self, layer: int) -> float:
        """The attention module's own ``attn_scale`` (``S = q·kᵀ / attn_scale``), ×(layer+1) included."""
        return float(self.model.blocks[self.check_layer(layer)].attn.attn_scale)

    # ---------------------------------------------------------------- weights
    def W_K(self, layer: int) -> Float[Tensor, "kv_head d_model d_head"]:
        """The parameter the model holds: ``_W_K [kv_head, …]`` under GQA, else ``W_K``."""
        attn = self._attn(layer)
        return self._get(attn, "_W_K" if hasattr(attn, "_W_K") else "W_K")

    def W_V(self, layer: int) -> Float[Tensor, "kv_head d_model d_head"]:
        attn = self._attn(layer)
        return self._get(attn, "_W_V" if hasattr(attn, "_W_V") else "W_V")

    def linear(self, layer: int, module: str) -> LinearHooks:
        """The hook points carrying ``module``'s factors (x at ``hook_in``, δ at ``hook_out``'s gradient)."""
        layer = self.check_layer(layer)
        table = {
            "q": ("attn_in", "q"), "k": ("attn_in", "k"), "v": ("attn_in", "v"), "o": ("z", "attn_out"),
            "mlp_in": ("mlp_in", "mlp_pre_linear" if self.gated_mlp else "mlp_pre"),
            "mlp_gate": ("mlp_in", "mlp_pre"), "mlp_out": ("mlp_post", "mlp_out"),
        }
        if module not in table:
            raise TLBackwardError(f"module must be one of {sorted(table)}, got {module!r}", argument="module")
        self._check_linear(module)
        x_kind, z_kind = table[module]
        return LinearHooks(HookRef(self.hook_name(x_kind, layer)), HookRef(self.hook_name(z_kind, layer)))

    def _check_linear(self, module: str) -> None:
        """Refuse configurations where the hooks above are not the matrix's input / output."""
        cfg = self.model.cfg
        if module == "mlp_gate" and not self.gated_mlp:
            raise TLBackwardError("mlp_gate exists only for gated MLPs (Llama-style); this MLP is not gated",
                                  argument="module")
        if module.startswith("mlp_") and (cfg.attn_only or getattr(cfg, "num_experts", None)):
            raise TLBackwardError(f"{module}: this HookedTransformer has no dense MLP (attention-only or mixture of "
                                  "experts); choose q, k, v or o", argument="module")
        if module in ("q", "k", "v") and (cfg.use_attn_in or cfg.use_split_qkv_input):
            raise TLBackwardError(f"{module}: with use_attn_in / use_split_qkv_input the attention reads a per-head "
                                  "input; call model.set_use_attn_in(False) / set_use_split_qkv_input(False)",
                                  argument="module")
        if module in ("q", "k") and cfg.positional_embedding_type == "shortformer":
            raise TLBackwardError(f"{module}: shortformer models add the position embedding to ln1's output before "
                                  f"W_{module.upper()}, so ln1.hook_out is not its input; choose v, o or the MLP",
                                  argument="module")
        if module in ("k", "v") and getattr(cfg, "ungroup_grouped_query_attention", False):
            raise TLBackwardError(f"{module}: with ungroup_grouped_query_attention hook_{module} holds the repeated "
                                  "heads, not the kv heads W_K/W_V act on; set it to False", argument="module")
        if module in ("o", "mlp_out") and getattr(cfg, "use_normalization_before_and_after", False):
            raise TLBackwardError(f"{module}: a norm after the sublayer (use_normalization_before_and_after) sits "
                                  f"between {module}'s output and hook_{'attn' if module == 'o' else 'mlp'}_out",
                                  argument="module")

    # ---------------------------------------------------------------- readout
    @torch.no_grad()
    def ln_final(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The model's ``ln_final`` (identity when ``normalization_type`` is None), in fp32."""
        if self.model.cfg.normalization_type is None:
            return v.float()
        norm = self.model.ln_final
        return norm(v.to(device=module_device(norm), dtype=param_dtype(self.model))).float()

    @property
    def logits_transform(self) -> Callable[[Tensor], Tensor] | None:
        """``c·tanh(logits / c)`` under ``output_logits_soft_cap`` c > 0 (HookedTransformer.forward), else None."""
        cap = getattr(self.model.cfg, "output_logits_soft_cap", None)
        if cap is None or cap <= 0:
            return None
        cap = float(cap)
        return lambda logits: cap * torch.tanh(logits / cap)


def _identity(x: Tensor) -> Tensor:
    return x
