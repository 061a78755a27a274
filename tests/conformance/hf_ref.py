"""Independent references on a plain Hugging Face model (no TransformerLens, no tl_backward).

Generic across families: the decoder layers, final norm and lm_head are found by module names;
residual-stream gradients are ``torch.autograd.grad`` with respect to the very tensors a layer
receives and returns (their *full* gradient, every branch included); attention probabilities P come
from ``output_attentions=True`` (on the autograd path in every family, tests/families.py), and the
Reversed Attention reference is the softmax Jacobian applied to ∂L/∂P:

    RA = ∂L/∂(q·kᵀ) = P ⊙ (dP − rowsum(P ⊙ dP)) · c · (1 − tanh²(u/cap)),

with c the factor HF multiplies q·kᵀ by (``scaling``, BLOOM ``inv_norm_factor``, MPT ``softmax_scale``,
GPT-J 1/``scale_attn``, GPT-Neo 1) and the last factor only under attention soft-capping (Gemma-2),
u = c·q·kᵀ recomputed from the q, k HF's own attention function receives.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

LAYER_LISTS = ("layers", "h", "blocks")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "ln_out")
# The submodule whose first input is resid_mid (the residual after attention), per layer class.
MID_INPUTS = ("ln_2", "pre_feedforward_layernorm", "post_attention_layernorm", "norm_2", "ln2")


def layers_of(hf: torch.nn.Module) -> torch.nn.ModuleList:
    n = hf.config.num_hidden_layers
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name.split(".")[-1] in LAYER_LISTS:
            return mod
    raise LookupError(f"no decoder layer list in {type(hf).__name__}")


def final_norm_of(hf: torch.nn.Module) -> torch.nn.Module:
    layer_names = {id(m) for m in layers_of(hf).modules()}
    for name, mod in hf.named_modules():
        if name.split(".")[-1] in FINAL_NORMS and id(mod) not in layer_names:
            return mod
    raise LookupError(f"no final norm in {type(hf).__name__}")


def mid_input_of(hf: torch.nn.Module, layer: torch.nn.Module) -> torch.nn.Module | None:
    """The module fed resid_mid, or None for parallel attention+MLP blocks and post-norm-only blocks
    (OLMo-2: its MLP takes resid_mid)."""
    if type(hf).__name__.startswith("Olmo2"):
        return layer.mlp
    cfg = hf.config
    if any(getattr(cfg, k, False) for k in ("use_parallel_residual", "parallel_attn")):
        return None
    names = [n for n, _ in layer.named_children()]
    if type(hf).__name__.startswith(("Phi", "GPTJ", "Cohere", "CodeGen")) and "Phi3" not in type(hf).__name__:
        return None  # one input norm feeds attention and MLP in parallel
    if type(hf).__name__.startswith("OPT"):
        return layer.final_layer_norm
    for n in MID_INPUTS:
        if n in names:
            return getattr(layer, n)
    return None


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


@dataclass
class Pass:
    """One forward (+ autograd.grad) of the reference: logits, residual tensors and attention."""

    logits: Tensor
    resid_pre: list[Tensor]
    # the tensor the mid-input module receives: [batch·pos, d] on OPT, whose decoder layer flattens the
    # hidden states before final_layer_norm and uses that flat tensor for the skip connection too, so
    # its gradient is the full one; reshape to [batch, pos, d] after autograd.grad
    resid_mid: list[Tensor | None]
    resid_post: list[Tensor]
    final_in: Tensor
    attentions: tuple[Tensor, ...]
    qk: list[Tensor | None]  # softcap only: u = c·q·kᵀ, pre-cap
    qk_inputs: list[tuple[Tensor, Tensor]]  # softcap only: (query, key with kv heads repeated)


@contextlib.contextmanager
def _recorded_qk(hf: torch.nn.Module, store: list):
    """Softcapped families only: wrap the modeling module's ``eager_attention_forward`` to record
    the pre-cap logits ``query·keyᵀ·scaling`` (kv heads repeated)."""
    mod = sys.modules[type(hf).__module__]
    cap = getattr(hf.config, "attn_logit_softcapping", None)
    original = getattr(mod, "eager_attention_forward", None)
    if not cap or original is None:
        yield
        return

    def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        rep = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(rep, 1)
        store.append(((query @ k.transpose(-1, -2)) * scaling, query, k))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    mod.eager_attention_forward = wrapper
    try:
        yield
    finally:
        mod.eager_attention_forward = original


def run(hf: torch.nn.Module, tokens: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Pass:
    """Forward with grad, recording the residual tensors, attention P and (softcap) pre-cap logits."""
    layers = layers_of(hf)
    pre: list = [None] * len(layers)
    post: list = [None] * len(layers)
    mid: list = [None] * len(layers)
    final: list = []
    qk: list = []
    handles = []

    def pre_hook(i):
        def hook(module, args, kw):
            pre[i] = args[0] if args else kw["hidden_states"]
        return hook

    def post_hook(i):
        def hook(module, args, out):
            post[i] = _first(out)
        return hook

    def mid_hook(i):
        def hook(module, args, kw):
            mid[i] = args[0] if args else next(iter(kw.values()))
        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i)))
        m = mid_input_of(hf, layer)
        if m is not None:
            handles.append(m.register_forward_pre_hook(mid_hook(i), with_kwargs=True))
    handles.append(final_norm_of(hf).register_forward_pre_hook(
        lambda module, args: final.append(args[0])))
    try:
        with torch.enable_grad(), _recorded_qk(hf, qk):
            out = hf(tokens, attention_mask=mask, output_attentions=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return Pass(logits=out.logits, resid_pre=pre, resid_mid=mid, resid_post=post, final_in=final[0],
                attentions=tuple(out.attentions), qk=[u for u, _, _ in qk] or [None] * len(layers),
                qk_inputs=[(q, k) for _, q, k in qk])


def attention_scale(hf: torch.nn.Module, layer: int, unscaled: bool) -> float:
    """c in scores = c·q·kᵀ (+ bias), read from the HF attention module."""
    attn = next(m for n, m in layers_of(hf)[layer].named_children() if n in ("self_attn", "attn", "attention",
                                                                            "self_attention"))
    attn = getattr(attn, "attention", attn)  # GPT-Neo wraps the real module
    if unscaled:
        return 1.0
    for name in ("scaling", "inv_norm_factor", "softmax_scale"):
        value = getattr(attn, name, None)
        if value is not None:
            return float(value)
    if getattr(attn, "scale_attn", None) is not None:
        return 1.0 / float(attn.scale_attn)
    if isinstance(getattr(attn, "scale", None), float):  # TransformerLens NativeAttention divides by it
        return 1.0 / attn.scale
    return float(attn.head_dim) ** -0.5


def reversed_attention(p: Tensor, dp: Tensor, scale: float, qk: Tensor | None, cap: float | None) -> Tensor:
    """P ⊙ (dP − rowsum(P ⊙ dP)) · c (· (1 − tanh²(u/cap)) when soft-capped)."""
    p, dp = p.double(), dp.double()
    ra = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    if cap:
        ra = ra * (1 - torch.tanh(qk.double() / cap) ** 2)
    return ra


def nll(logits: Tensor, rows: Tensor, positions: Tensor, labels: Tensor) -> Tensor:
    """Σ −log softmax(logits[rows, positions])[labels]."""
    picked = logits[rows, positions].float()
    return -torch.log_softmax(picked, -1).gather(-1, labels[:, None]).sum()


Loss = Callable[[Tensor], Tensor]
