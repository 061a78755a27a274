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
  :func:`tl_backward.capture` computes from the captured ``hook_normalized``, and ``ln1.hook_in`` /
  ``ln2.hook_in`` (the residual the norm reads). Their gradients (``derived_grads``), where one norm
  output feeds the sublayer: ``∂L/∂ln1_out = Σ_h g_q W_Qᵀ + g_k W_Kᵀ + g_v W_Vᵀ`` (hook_q/k/v gradients),
  ``∂L/∂ln2_out = g_pre W_inᵀ`` (gated: ``g_pre W_gateᵀ + g_pre_linear W_inᵀ``), and at ``hook_in`` the
  norm's branch only: the VJP of the model's own norm module at its input (flow graphs' LN edges).
* **Rotary tables** (flow graphs): the attention module's ``rotary_cos`` / ``rotary_sin`` buffers, in the
  ``rotate_half`` convention unless ``rotary_adjacent_pairs`` (refused).
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
from .compat import LAYERNORM_HOOK_AFTER_AFFINE, POST_NORM_ARCHITECTURES, HookedLayerNorm
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
            "read weights through the adapter (adapter.W_out(layer), adapter.mlp_out_weight(layer), ...)",
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
        self.has_mlp = not cfg.attn_only
        cap = getattr(cfg, "attn_scores_soft_cap", None)
        softcap = float(cap) if cap is not None and cap > 0 else None
        self.routes = tuple(ScoreRoute(softcap=softcap) for _ in range(self.n_layers))
        self.derived_hooks: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {}
        self.derived_grads: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[dict, dict], Tensor]]] = {}
        for l in range(self.n_layers):
            self._derive(l, "ln1", "attn_in", "resid_pre", self._attn_in_grad)
            if not cfg.attn_only:
                self._derive(l, "ln2", "mlp_in", "resid_pre" if self.parallel_blocks else "resid_mid",
                             self._mlp_in_grad)
        self.values_only_hooks = frozenset(self.derived_hooks) - frozenset(self.derived_grads)
        # TransformerBlock calls ln1 three times (query, key and value inputs, transformer_block.py): its
        # hooks fire thrice on one value, each backward firing carrying one path's share of the gradient.
        norms = cfg.normalization_type in _NORMS
        self.summed_grad_hooks = frozenset(
            f"blocks.{l}.ln1.{h}" for l in range(self.n_layers) for h in ("hook_scale", "hook_normalized") if norms)

    def _derive(self, layer: int, ln: str, out_kind: str, in_kind: str,
                out_grad: Callable[[int, dict], Tensor]) -> None:
        """Declare ``blocks.{layer}.{ln}.hook_out`` (= the sublayer's input) and ``{ln}.hook_in`` (= the
        residual ``in_kind`` it normalises) with their gradients, where one norm output feeds the sublayer:
        ``out_grad`` maps the captured gradients to ∂L/∂(norm output); the input's is its VJP through the norm."""
        out, inp, resid = (HOOKED_HOOKS[k].format(l=layer) for k in (out_kind, f"{ln}_in", in_kind))
        self.derived_hooks[out] = self._norm_output(layer, ln, in_kind)
        self.derived_hooks[inp] = (resid, _identity)
        reads = self._grad_sources(layer, out_kind)
        if reads is None:
            return
        self.derived_grads[out] = ((), reads, lambda acts, grads: out_grad(layer, grads))
        self.derived_grads[inp] = ((resid,), reads,
                                   lambda acts, grads: self._norm_vjp(layer, ln, acts[resid], out_grad(layer, grads)))

    def _grad_sources(self, layer: int, out_kind: str) -> tuple[str, ...] | None:
        """The hooks whose gradients give ∂L/∂(ln1 / ln2 output), None where no one output feeds the sublayer
        (per-head attention inputs under use_attn_in / use_split_qkv_input; mixture-of-experts MLPs)."""
        cfg = self.model.cfg
        if out_kind == "attn_in":
            if cfg.use_attn_in or cfg.use_split_qkv_input:
                return None
            return tuple(HOOKS[k].format(l=layer) for k in ("q", "k", "v"))
        if getattr(cfg, "num_experts", None):
            return None
        kinds = ("mlp_pre", "mlp_pre_linear") if self.gated_mlp else ("mlp_pre",)
        return tuple(HOOKS[k].format(l=layer) for k in kinds)

    def _attn_in_grad(self, layer: int, grads: dict) -> Tensor:
        """∂L/∂(ln1 output) = Σ_h g_q[h] W_Q[h]ᵀ + g_k[h'] W_K[h']ᵀ + g_v[h'] W_V[h']ᵀ (q = x W_Q + b_Q, …; a
        shortformer position embedding added to x does not change it); K/V heads as ``hook_k`` holds them."""
        attn, total = self.model.blocks[layer].attn, None
        for kind, names in (("q", ("W_Q",)), ("k", ("_W_K", "W_K")), ("v", ("_W_V", "W_V"))):
            g = grads[HOOKS[kind].format(l=layer)]  # [batch, pos, head, d_head]
            w = next(getattr(attn, n) for n in names if hasattr(attn, n) and getattr(attn, n).shape[0] == g.shape[-2])
            part = torch.einsum("bphe,hde->bpd", g, on(w.detach().float(), g))
            total = part if total is None else total + part
        return total

    def _mlp_in_grad(self, layer: int, grads: dict) -> Tensor:
        """∂L/∂(ln2 output) = g_pre W_inᵀ (gated: g_pre W_gateᵀ + g_pre_linear W_inᵀ; pre = x W_gate,
        pre_linear = x W_in in TransformerLens's GatedMLP)."""
        mlp, name = self.model.blocks[layer].mlp, HOOKS["mlp_pre"].format(l=layer)
        g = grads[name]
        if not self.gated_mlp:
            return g @ on(mlp.W_in.detach().float(), g).T
        linear = grads[HOOKS["mlp_pre_linear"].format(l=layer)]
        return g @ on(mlp.W_gate.detach().float(), g).T + linear @ on(mlp.W_in.detach().float(), g).T

    def _norm_vjp(self, layer: int, ln: str, x: Tensor, g_out: Tensor) -> Tensor:
        """∂L/∂(norm input) along this norm's branch: the VJP of the model's own ``blocks[layer].{ln}`` (gain, bias,
        eps, nn.Identity without normalisation) at its input x, applied to ∂L/∂(its output). Local: only x
        is a leaf, so no parameter .grad is written."""
        module = getattr(self.model.blocks[layer], ln)
        with torch.enable_grad():
            leaf = x.detach().to(param_dtype(self.model)).requires_grad_(True)
            out = module(leaf)
            (grad,) = torch.autograd.grad(out, leaf, g_out.to(device=out.device, dtype=out.dtype))
        return grad.float()

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
        if kind in ("mlp_in", "ln2_in") and self.model.cfg.attn_only:
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

    def rotary_tables(self, layer: int, n_pos: int) -> tuple[Tensor, Tensor]:
        """As :meth:`ModelAdapter.rotary_tables`: the attention module's own ``rotary_cos`` / ``rotary_sin``
        buffers ``[cache, rotary_dim]`` (``x_rot·cos + rotate_every_two(x_rot)·sin`` in abstract_attention.py,
        which is ``rotate_half`` unless ``rotary_adjacent_pairs``, GPT-J's pairing, refused here)."""
        attn = self._attn(layer)
        if not self.rotary:
            raise TLBackwardError("this HookedTransformer has no rotary embedding", argument="model")
        if self.model.cfg.rotary_adjacent_pairs:
            raise TLBackwardError("rotary_adjacent_pairs (GPT-J's pairing of adjacent dims) is not the rotate_half "
                                  "convention the rotary tables are read in: not supported", argument="model")
        cos, sin = attn.rotary_cos, attn.rotary_sin
        if cos.shape[0] < n_pos:  # the module grows its cache on a longer forward pass
            raise TLBackwardError(f"layer {layer}'s rotary cache holds {cos.shape[0]} positions, fewer than "
                                  f"{n_pos}: run the model on the prompt first", argument="model")
        return cos[:n_pos].detach().float().cpu(), sin[:n_pos].detach().float().cpu()

    def require_pre_norm_blocks(self, feature: str) -> None:
        """As :meth:`ModelAdapter.require_pre_norm_blocks`: refuses OLMo-2 / 3's post-norm blocks, per-head
        attention inputs (``use_attn_in`` / ``use_split_qkv_input``) and norms after the sublayers."""
        cfg = self.model.cfg
        why = ("its blocks are post-norm (ln1 / ln2 follow attention / MLP)"
               if cfg.original_architecture in POST_NORM_ARCHITECTURES else
               "the attention reads per-head inputs (use_attn_in / use_split_qkv_input; set them False)"
               if cfg.use_attn_in or cfg.use_split_qkv_input else
               "a norm follows each sublayer (use_normalization_before_and_after)"
               if getattr(cfg, "use_normalization_before_and_after", False) else None)
        if why is not None:
            raise TLBackwardError(f"{feature} draws VISIT's pre-norm block (one ln1 output feeding q, k and v, one "
                                  f"ln2 output the MLP), but {why}", argument="model")

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

    def mlp_out_weight(self, layer: int) -> tuple[Tensor, bool]:
        """As :meth:`ModelAdapter.mlp_out_weight`: the parameter ``blocks[layer].mlp.W_out [d_mlp, d_model]``
        (``mlp_out = post @ W_out + b_out``, plain and gated MLPs alike), so ``out_in`` is False. Refused on
        attention-only and mixture-of-experts models and where a norm follows the MLP
        (``use_normalization_before_and_after``: W_out's output is not ``hook_mlp_out`` there)."""
        layer = self.check_layer(layer)
        self.require_dense_mlp([layer], "editing W_out")
        if getattr(self.model.cfg, "use_normalization_before_and_after", False):
            raise TLBackwardError("editing W_out: a norm after the MLP (use_normalization_before_and_after) sits "
                                  "between W_out's output and hook_mlp_out, so the edit's effect is not "
                                  "η‖x‖²e_t there", argument="model")
        weight = self.model.blocks[layer].mlp.W_out
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (self.d_mlp, self.d_model) or \
                not weight.is_floating_point():
            raise TLBackwardError(f"blocks[{layer}].mlp.W_out is {getattr(weight, 'dtype', None)} "
                                  f"{tuple(getattr(weight, 'shape', ()))}, expected a floating-point "
                                  f"{(self.d_mlp, self.d_model)}", argument="model")
        return weight, False

    def require_dense_mlp(self, layers: Any, feature: str) -> None:
        """As :meth:`ModelAdapter.require_dense_mlp`; a mixture-of-experts HookedTransformer
        (``cfg.num_experts``) is refused too: its experts are not one set of neurons."""
        super().require_dense_mlp(layers, feature)
        if getattr(self.model.cfg, "num_experts", None):
            raise TLBackwardError(f"{feature} reads one dense MLP's neurons, but this HookedTransformer's MLPs are "
                                  f"mixtures of {self.model.cfg.num_experts} experts; use a TransformerBridge "
                                  "(its MoE support: expert_lens, per-expert factors)", argument="model")

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
