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
* :class:`PatternRoute` -- the generic bridge around boot_native's ``NativeAttention`` (also a legacy
  TransformerLens checkpoint loaded into it), which multiplies the *hooked* pattern by V:
  ``dP`` is ``hook_pattern``'s gradient and ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``, s = its ``scale``.
* anything else: RA and attention patching are refused with the reason (:class:`Unsupported`);
  capture, factors and lens do not depend on this.

The scale s (``S = A / s``) comes from the HF module: ``1/scaling``, MPT's ``1/softmax_scale``
(``attn_config.softmax_scale``), BLOOM's ``1/inv_norm_factor``; GPT-Neo scales by nothing (s = 1);
GPT-2's ``scale_attn_by_inverse_layer_idx`` is inside transformers 5's ``scaling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor
from transformers.models.codegen.modeling_codegen import CodeGenAttention
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention
from transformers.models.gptj.modeling_gptj import GPTJAttention

from tl_backward.errors import TLBackwardError

from .compat import (
    TL_VERSION,
    AttentionBridge,
    BloomAttentionBridge,
    JointQKVAttentionBridge,
    JointQKVPositionEmbeddingsAttentionBridge,
    MPTALiBiAttentionBridge,
    NativeAttention,
    PositionEmbeddingsAttentionBridge,
)

__all__ = ["ROUTES", "PatternRoute", "ScoreRoute", "Unsupported", "ValueRoute", "attention_route", "attention_scale",
           "hidden_rotary", "softcap_of", "softmax_logit_grad"]

# HF attention modules that apply no scale at all (s = 1): GPT-Neo (modeling_gpt_neo.py, `_attn`).
UNSCALED_HF_ATTENTION = (GPTNeoSelfAttention,)
# HF attention modules that rotate q and k themselves (GPT-J / CodeGen: ``rotate_every_two`` on the
# first ``rotary_dim`` dims) after the bridge's hook_q/hook_k, with no hook_cos/hook_sin or
# hook_rot_q/hook_rot_k firing: hook_q·hook_kᵀ is not the model's q·kᵀ there.
HIDDEN_ROTARY_HF_ATTENTION = (GPTJAttention, CodeGenAttention)
# HF module attributes holding the multiplier 1/s, in the order they are tried.
_INVERSE_SCALE_ATTRIBUTES = ("scaling", "softmax_scale", "inv_norm_factor")


def softcap_of(attn: Any) -> float | None:
    """Gemma-2's ``attn_logit_softcapping`` c of a bridge's HF module, None when off."""
    cap = getattr(attn.original_component, "attn_logit_softcapping", None)
    return None if cap in (None, 0, 0.0) else float(cap)


def hidden_rotary(attn: Any) -> str | None:
    """Why ``hook_q[p]·hook_k[i]`` is not the model's ``s·score[p, i]`` on the bridge ``attn`` (None
    when it is): the wrapped module rotates q and k after those hooks and the rotation is not
    hooked (:data:`HIDDEN_ROTARY_HF_ATTENTION`; boot_native's ``NativeAttention`` with RoPE). A
    HookedTransformer's attention wraps no HF module and fires ``hook_rot_q``/``hook_rot_k`` itself: None."""
    hf_attn = getattr(attn, "original_component", None)
    name = type(hf_attn).__name__
    if isinstance(hf_attn, HIDDEN_ROTARY_HF_ATTENTION):
        return (f"{name} rotates q and k inside HF (rotary_dim = {getattr(hf_attn, 'rotary_dim', None)}) after "
                "hook_q/hook_k, and the bridge fires neither hook_rot_q/hook_rot_k nor hook_cos/hook_sin")
    if isinstance(hf_attn, NativeAttention) and hf_attn.rotary is not None:
        return (f"{name} applies RoPE after hook_q/hook_k and the bridge fires neither hook_rot_q/hook_rot_k nor "
                "hook_cos/hook_sin")
    return None


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
    if isinstance(hf_attn, NativeAttention):  # divides q·kᵀ by its own ``scale``
        return float(hf_attn.scale)
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


def softmax_logit_grad(p: Float[Tensor, "batch head query_pos key_pos"],
                       dp: Float[Tensor, "batch head query_pos key_pos"],
                       scale: float) -> Float[Tensor, "batch head query_pos key_pos"]:
    """``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s`` (the softmax's backward, then the scale), exactly 0 where
    ``P == 0`` (``dP`` need not be 0 at masked entries)."""
    r = (p * dp).sum(-1, keepdim=True)
    return (p * (dp - r) / scale).masked_fill(p == 0, 0.0)


@dataclass(frozen=True)
class ValueRoute:
    """``hook_attn_scores`` is off the autograd path but ``z = P·V`` with ``P`` = ``hook_pattern``'s
    values: ``dP = ∂L/∂z · Vᵀ`` per head (kv heads expanded), ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``."""

    n_heads: int
    activations: tuple[str, ...] = ("pattern", "v", "z")
    # Why capture refuses hook_attn_scores on these layers (and leaves it out of filters).
    misfired_scores: ClassVar[str] = (
        "on this model's attention bridge (TransformerLens's generic AttentionBridge, HF computes the softmax) "
        "hook_attn_scores fires on the post-softmax weights HF returns, after the model used them: its values "
        "are the pattern, not the scores, and no gradient reaches it. Capture hook_pattern for the attention "
        "pattern, and use tl_backward.reversed_attention for ∂L/∂(q·kᵀ) (read through z = pattern·V)")
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
        return softmax_logit_grad(p, dp, scale)


@dataclass(frozen=True)
class PatternRoute:
    """``hook_pattern`` is on the autograd path (the model multiplies the hooked pattern by V:
    boot_native's ``NativeAttention`` takes it as ``pattern_fn``) but ``hook_attn_scores`` is not:
    ``dP`` is the pattern hook's gradient and ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``."""

    activations: tuple[str, ...] = ("pattern",)
    gradients: tuple[str, ...] = ("pattern",)
    patch_kind: str = "pattern"  # the hooked pattern is the one multiplied by V
    misfired_scores: ClassVar[str] = (
        "on this boot_native model (TransformerLens's NativeAttention) hook_attn_scores fires on the returned "
        "post-softmax pattern after the model used it: its values are the pattern, not the scores, and no "
        "gradient reaches it. Capture hook_pattern (on the autograd path here), and use "
        "tl_backward.reversed_attention for ∂L/∂(q·kᵀ)")

    def check_forward(self, acts: dict[str, Tensor], layer: int) -> None:
        """Nothing to check: the gradient is read at the pattern the model multiplies by V."""

    def logit_grad(self, acts: dict[str, Tensor], grads: dict[str, Tensor],
                   scale: float) -> Float[Tensor, "batch head query_pos key_pos"]:
        """``RA`` from ``P`` and ``dP = ∂L/∂P`` (both at hook_pattern), fp32, exactly 0 where ``P == 0``."""
        return softmax_logit_grad(acts["pattern"].float(), grads["pattern"].float(), scale)


@dataclass(frozen=True)
class Unsupported:
    """RA is not exact on this bridge; :meth:`refuse` says why. ``forward`` is the route whose
    *values* still hold where only the gradients are missing (TransformerLens 3.x's NativeAttention:
    hook_pattern carries the pattern used, but no gradient), so forward flow graphs keep working;
    ``misfired_scores`` is then why ``hook_attn_scores`` is refused by name."""

    reason: str
    forward: PatternRoute | None = None
    misfired_scores: str | None = None

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
    if type(attn) in VALUE_ROUTE_CLASSES and isinstance(attn.original_component, NativeAttention):
        if not getattr(attn.original_component, "accepts_pattern_fn", False):  # TransformerLens < 4.x
            return Unsupported(
                f"TransformerLens {TL_VERSION}'s NativeAttention multiplies V by its own pattern and returns the one "
                "hook_pattern sees beside its output, off the autograd path (TransformerLens 4.x passes hook_pattern "
                "into the attention: upgrade, or boot the model with TransformerBridge.boot_transformers)",
                forward=PatternRoute(), misfired_scores=(
                    f"on this boot_native model (TransformerLens {TL_VERSION}'s NativeAttention) hook_attn_scores fires "
                    "on the returned post-softmax pattern: its values are the pattern, not the scores, and no gradient "
                    "reaches it (nor hook_pattern); capture hook_pattern for the pattern's values"))
        if attn.original_component.attn_scores_soft_cap > 0:  # the cap's input is never hooked
            return Unsupported("boot_native's soft-capped attention exposes neither q·kᵀ nor the capped scores "
                               "on the autograd path")
        return PatternRoute()
    if type(attn) in VALUE_ROUTE_CLASSES:
        if softcap_of(attn):
            return Unsupported(f"{type(attn).__name__} delegates a soft-capped attention to HF")
        return ValueRoute(n_heads=n_heads)
    return Unsupported(f"attention bridge {type(attn).__name__} fires hook_attn_scores outside the autograd path "
                       "and is not known to compute z = pattern·V; boot the model with "
                       "TransformerBridge.boot_transformers(...) from an HF model")
