"""Per-family attention knowledge: where Reversed Attention can be read, and the attention scale.

Reversed Attention (Katz & Wolf, NAACL 2025) is ``RA = ∂L/∂A`` for the raw logits ``A = Q Kᵀ``.
How it can be read depends on the TransformerLens attention bridge, dispatched here with
``isinstance`` on TransformerLens classes (:data:`ROUTES`, most specific first):

* :class:`ScoreRoute` -- bridges that recompute attention themselves and fire
  ``hook_attn_scores`` before the softmax, on the autograd path (GPT-2 ``JointQKVAttentionBridge``
  and its subclasses BLOOM ``BloomAttentionBridge``, MPT ``MPTALiBiAttentionBridge``; Llama-style
  ``PositionEmbeddingsAttentionBridge`` and subclasses such as SmolLM3's; NeoX/Phi
  ``JointQKVPositionEmbeddingsAttentionBridge``). ``RA = ∂L/∂S / s``; with Gemma-2 soft-capping
  (``S = c·tanh(A/(s·c))``, hook after the cap) ``RA = ∂L/∂S · (1 − (S/c)²) / s``.
* :class:`ValueRoute` -- the generic, delegating ``AttentionBridge`` (GPT-J, OPT, GPT-Neo): HF
  computes the softmax and ``hook_attn_scores``/``hook_pattern`` fire afterwards on the returned
  weights, off the autograd path. ``hook_v`` and ``hook_z`` are on it, and ``z = P·V`` per head, so
  ``dP = ∂L/∂z · Vᵀ`` (kv heads expanded) and ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``.
* anything else: RA and attention patching are refused with the reason (:class:`Unsupported`);
  capture, factors and lens do not depend on this.

The scale s (``S = A / s``) comes from the HF module: ``1/scaling``, MPT's ``1/softmax_scale``
(``attn_config.softmax_scale``), BLOOM's ``1/inv_norm_factor``; GPT-Neo scales by nothing (s = 1);
GPT-2's ``scale_attn_by_inverse_layer_idx`` is inside transformers 5's ``scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

from tl_backward.errors import TLBackwardError

from .compat import (
    AttentionBridge,
    BloomAttentionBridge,
    JointQKVAttentionBridge,
    JointQKVPositionEmbeddingsAttentionBridge,
    MPTALiBiAttentionBridge,
    NativeAttention,
    PositionEmbeddingsAttentionBridge,
)

__all__ = ["ROUTES", "ScoreRoute", "Unsupported", "ValueRoute", "attention_route", "attention_scale",
           "softcap_of"]

# HF attention modules that apply no scale at all (s = 1): GPT-Neo (modeling_gpt_neo.py, `_attn`).
UNSCALED_HF_ATTENTION = (GPTNeoSelfAttention,)
# HF module attributes holding the multiplier 1/s, in the order they are tried.
_INVERSE_SCALE_ATTRIBUTES = ("scaling", "softmax_scale", "inv_norm_factor")


def softcap_of(attn: Any) -> float | None:
    """Gemma-2's ``attn_logit_softcapping`` c of a bridge's HF module, None when off."""
    cap = getattr(attn.original_component, "attn_logit_softcapping", None)
    return None if cap in (None, 0, 0.0) else float(cap)


def attention_scale(attn: Any, layer: int, d_head: int) -> float:
    """s with ``S = Q Kᵀ / s`` (before mask and soft-cap) for the bridge ``attn`` at ``layer``.

    From the HF module: ``1/scaling`` (transformers 5 folds GPT-2's inverse-layer factor into it;
    OPT keeps it although it pre-multiplies q), ``1/softmax_scale`` (MPT), ``1/inv_norm_factor``
    (BLOOM), 1 for :data:`UNSCALED_HF_ATTENTION` (GPT-Neo); else √d_head, ×(layer+1) under
    ``scale_attn_by_inverse_layer_idx``. Tests check each against real scores or HF autograd.
    """
    hf_attn = attn.original_component
    if isinstance(hf_attn, UNSCALED_HF_ATTENTION):
        return 1.0
    for name in _INVERSE_SCALE_ATTRIBUTES:
        value = getattr(hf_attn, name, None)
        if isinstance(value, Tensor) and value.numel() == 1:  # some modules keep it as a buffer
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return 1.0 / float(value)
    scale = float(d_head) ** 0.5
    if getattr(hf_attn, "scale_attn_by_inverse_layer_idx", False):
        scale *= layer + 1
    return scale


@dataclass(frozen=True)
class ScoreRoute:
    """``hook_attn_scores`` is on the autograd path: read its gradient (and, under soft-capping,
    its values). ``softcap``: Gemma-2's c, or None."""

    softcap: float | None = None
    patch_kind: str = "pattern"  # patch_attention edits hook_pattern, which the bridge multiplies by V

    @property
    def activations(self) -> tuple[str, ...]:
        return ("pattern", "attn_scores") if self.softcap else ("pattern",)

    gradients: tuple[str, ...] = ("attn_scores",)

    def check_forward(self, acts: dict[str, Tensor], layer: int) -> None:
        """Nothing to check: the gradient is read where the bridge itself computes the scores."""

    def logit_grad(self, acts: dict[str, Tensor], grads: dict[str, Tensor],
                   scale: float) -> Float[Tensor, "batch head query_pos key_pos"]:
        """``∂L/∂A = ∂L/∂S / s`` (× ``1 − (S/c)²`` under soft-capping), fp32. Masked entries: the
        softmax gives exactly 0 gradient there, and ``S/c`` is clamped to ±1 so the sentinel stays finite."""
        grad = grads["attn_scores"].float()
        if self.softcap:
            u = (acts["attn_scores"].float() / self.softcap).clamp(-1.0, 1.0)
            grad = grad * (1.0 - u * u)
        return grad / scale


@dataclass(frozen=True)
class ValueRoute:
    """``hook_attn_scores`` is off the autograd path but ``z = P·V`` with ``P`` = ``hook_pattern``'s
    values: ``dP = ∂L/∂z · Vᵀ`` per head (kv heads expanded), ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``."""

    n_heads: int
    activations: tuple[str, ...] = ("pattern", "v", "z")
    gradients: tuple[str, ...] = ("z",)
    patch_kind: str = "z"  # patch_attention adds η·Δ·V to hook_z, i.e. z = (P + η·Δ)·V

    def expand(self, v: Float[Tensor, "batch pos kv_head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        """Key/value heads repeated for the query heads that read them (GQA/MQA)."""
        return v.repeat_interleave(self.n_heads // v.shape[2], dim=2)

    def mix(self, weights: Float[Tensor, "batch head query_pos key_pos"],
            v: Float[Tensor, "batch pos kv_head d_head"]) -> Float[Tensor, "batch query_pos head d_head"]:
        """``weights · V`` per head, in ``hook_z``'s layout."""
        return torch.einsum("bhqk,bkhd->bqhd", weights, self.expand(v).to(weights.dtype))

    def check_forward(self, acts: dict[str, Tensor], layer: int) -> None:
        """Refuse unless ``hook_z == hook_pattern · hook_v`` in this forward (to max(1e-3, 16·eps of the
        model's dtype) of max|z|, far above rounding, far below any structural difference): the
        route's one assumption."""
        tol = max(1e-3, 16 * torch.finfo(acts["z"].dtype).eps)
        z, mixed = acts["z"].float(), self.mix(acts["pattern"].float(), acts["v"].float())
        if z.shape != mixed.shape or float((z - mixed).abs().max()) > tol * float(z.abs().max()) + 1e-12:
            raise TLBackwardError(
                f"Reversed Attention is not available here: at layer {layer} hook_z is not hook_pattern · hook_v, "
                "so ∂L/∂pattern cannot be read from ∂L/∂z on this HF-delegating bridge. A hook on hook_z (an "
                "active patch_attention or zero_heads) edits z: compute RA outside that block", argument="model")

    def logit_grad(self, acts: dict[str, Tensor], grads: dict[str, Tensor],
                   scale: float) -> Float[Tensor, "batch head query_pos key_pos"]:
        """``RA`` from ``P`` (hook_pattern values), ``V`` (hook_v values) and ``∂L/∂z``, fp32,
        exactly 0 wherever ``P == 0`` (``dP`` itself is not 0 at masked entries)."""
        p = acts["pattern"].float()
        dp = torch.einsum("bqhd,bkhd->bhqk", grads["z"].float(), self.expand(acts["v"].float()))
        r = (p * dp).sum(-1, keepdim=True)
        return (p * (dp - r) / scale).masked_fill(p == 0, 0.0)


@dataclass(frozen=True)
class Unsupported:
    """RA is not exact on this bridge; :meth:`refuse` says why."""

    reason: str

    def refuse(self, feature: str) -> None:
        raise TLBackwardError(f"{feature} is not available for this model: {self.reason}. Capture, factors and "
                              "the lens still work", argument="model")


# TransformerLens attention-bridge class -> route kind, most specific first; isinstance dispatch.
# Each entry was checked by reading the class (where hook_attn_scores fires) and by tests
# (tests/attention/test_reversed.py, tests/attention/test_ra_families.py).
ROUTES: tuple[tuple[type, str], ...] = (
    (MPTALiBiAttentionBridge, "scores"),  # clip_qkv, softmax_scale, then hook_attn_scores
    (BloomAttentionBridge, "scores"),  # ALiBi baddbmm, mask, then hook_attn_scores
    (JointQKVPositionEmbeddingsAttentionBridge, "scores"),
    (PositionEmbeddingsAttentionBridge, "scores"),  # soft-cap (Gemma-2) sits before the hook
    (JointQKVAttentionBridge, "scores"),
)
# Only the generic bridge itself wrapping an HF module: its subclasses (MLA, T5Gemma2, …) compute
# differently, and boot_native's NativeAttention is not verified.
VALUE_ROUTE_CLASSES = (AttentionBridge,)


def attention_route(attn: Any, n_heads: int) -> ScoreRoute | ValueRoute | Unsupported:
    """How RA is read on the attention bridge ``attn`` (see the module docstring)."""
    for cls, kind in ROUTES:
        if isinstance(attn, cls):
            return ScoreRoute(softcap=softcap_of(attn))
    if type(attn) in VALUE_ROUTE_CLASSES and not isinstance(attn.original_component, NativeAttention):
        if softcap_of(attn):
            return Unsupported(f"{type(attn).__name__} delegates a soft-capped attention to HF")
        return ValueRoute(n_heads=n_heads)
    return Unsupported(f"attention bridge {type(attn).__name__} fires hook_attn_scores outside the autograd path "
                       "and is not known to compute z = pattern·V (e.g. boot_native models); boot the model with "
                       "TransformerBridge.boot_transformers(...) from an HF model")
