"""Sparse mixture-of-experts MLPs (TransformerLens ``MoEBridge``): routing and per-expert factors.

TransformerLens hooks a sparse MLP only at its boundary (``mlp.hook_in`` / ``mlp.hook_out``) and at
its router (``<router>.hook_out`` = logits, ``hook_expert_weights`` = the top-k routing weights
scattered to ``[tokens, expert]``). The experts are batched 3-D Hugging Face parameters
(``gate_up_proj [expert, 2·d_expert, d_model]`` and ``down_proj [expert, d_model, d_expert]``, or
transposed and interleaved with biases in GPT-OSS), with no hook inside. The child name ``gate`` is
the *router* in Mixtral / OLMoE / Qwen-MoE, ``router`` in GPT-OSS: neither is a gate projection.

For expert e, token i routed to it with weight ``w_ie``, and ``g_i = ∂L/∂(MoE output)_i`` (the
gradient at ``mlp.hook_out``; a shared expert adds to the output, so it does not change g)::

    y_i  = Σ_e w_ie · down_e(h_i^e),   h_i^e = act(gate_e(x_i)) ⊙ up_e(x_i)   (HF ``_apply_gate``)
    δ_out_i^e = w_ie · g_i                              (the routing weight sits inside δ)
    δ_pre_i^e = VJP of h^e at pre_i^e = x_i W_gate_up^e, applied to δ_out_i^e · W_down^eᵀ
    ∂L/∂W_down^e = Σ_{i→e} h_i^e ⊗ δ_out_i^e,   ∂L/∂W_up^e = Σ_{i→e} x_i ⊗ δ_up_i^e  (gate likewise)
    ∂L/∂W_router = Σ_i x_i ⊗ ∂L/∂logits_i

Qwen2-MoE adds a shared expert read by every token, gated by a sigmoid of a scalar logit
``s_i = x_i W_sg`` (``W_sg [d_model, 1]``, HF ``shared_expert_gate``)::

    y_i += σ(s_i) · down_s(h_i^s),     h_i^s = act(x_i W_gate^s) ⊙ x_i W_up^s
    δ_out_i^s = σ(s_i) g_i,   δ_s_i = σ'(s_i) ⟨g_i, down_s(h_i^s)⟩,   up / gate: VJP of h^s

TransformerLens bridges the shared expert's three linear maps and ``shared_expert_gate`` as
``LinearBridge`` modules, so their factors are the hooks' (input, output gradient) of the same
backward, like a dense MLP's (hooks flattened to ``[batch·pos, d]``): the sigmoid sits inside δ.

x, g and ∂L/∂w come from the one forward + backward of :func:`tl_backward.core.stream.stream`
(through ``capture``); h^e, δ_pre^e and ∂L/∂logits are then exact local vector-Jacobian products
of the HF module's own per-expert map (its ``_apply_gate``, layout flags ``is_transposed`` /
``is_concatenated`` / ``has_bias`` set by transformers' ``use_experts_implementation``) and of its
router's own forward, on detached inputs with frozen weights: no parameter ``.grad`` is written.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from tl_backward.errors import TLBackwardError

from .compat import GatedMLPBridge, LinearBridge, MoEBridge, MoERouterBridge, unwrap_bridge

# HF sparse blocks whose output is the routed experts' weighted sum (plus, in Qwen2-MoE, a gated
# shared expert that does not read the experts): there g = ∂L/∂(mlp.hook_out) is the gradient at
# the experts' output. Looked up in sys.modules (a model of the class has imported its module), so
# importing tl_backward imports no model code. Verified in tests/lens/test_moe_factors.py.
VERIFIED_BLOCKS = {
    "transformers.models.mixtral.modeling_mixtral": "MixtralSparseMoeBlock",
    "transformers.models.olmoe.modeling_olmoe": "OlmoeSparseMoeBlock",
    "transformers.models.qwen2_moe.modeling_qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "transformers.models.qwen3_moe.modeling_qwen3_moe": "Qwen3MoeSparseMoeBlock",
    "transformers.models.gpt_oss.modeling_gpt_oss": "GptOssMLP",
}
# Expert matrices with factors; "router" is the router's linear map (never a gate).
EXPERT_MODULES = ("mlp_in", "mlp_gate", "mlp_out")
# Shared-expert factor modules -> (child of the MoE bridge, LinearBridge inside it or None): the
# TransformerLens names of Qwen2-MoE's GatedMLPBridge ``shared_expert`` and ``shared_expert_gate``.
SHARED_MODULES = {"shared_in": ("shared_expert", "in"), "shared_gate": ("shared_expert", "gate"),
                  "shared_out": ("shared_expert", "out"), "shared_expert_gate": ("shared_expert_gate", None)}


@dataclass(frozen=True)
class MoELayer:
    """One sparse MLP layer: its HF experts and router modules and the hooks its factors read.

    ``hooks = (x, g, w)``: ``mlp.hook_in`` (x, its activation), ``mlp.hook_out`` (g, its gradient)
    and the router's ``hook_expert_weights`` (w and ∂L/∂w, ``[batch·pos, expert]``). ``shared``:
    ``(module, hook_in, hook_out)`` of each shared-expert linear map (Qwen2-MoE; empty otherwise).
    """

    layer: int
    experts: nn.Module
    router: nn.Module
    n_experts: int
    top_k: int
    d_expert: int
    gated: bool
    hooks: tuple[str, str, str]
    shared: tuple[tuple[str, str, str], ...] = ()

    def __repr__(self) -> str:
        return (f"MoELayer(layer {self.layer}: {type(self.experts).__name__}, {self.n_experts} experts, "
                f"top-{self.top_k}, d_expert {self.d_expert}{', gated' if self.gated else ''}"
                f"{', shared expert' if self.shared else ''})")

    def shared_hooks(self, module: str) -> tuple[str, str] | None:
        """``(hook_in, hook_out)`` of shared-expert ``module`` (x and the hook whose gradient is δ),
        None when this layer has no such map."""
        return next(((i, o) for m, i, o in self.shared if m == module), None)

    def weight(self, module: str) -> Float[Tensor, "expert d_in d_out"]:
        """The experts' matrix in TransformerLens layout ``[expert, d_in, d_out]`` (fp32 copy):
        ``mlp_in`` (up) / ``mlp_gate`` ``[expert, d_model, d_expert]``, ``mlp_out`` (down)
        ``[expert, d_expert, d_model]``."""
        ex = self.experts
        if module == "mlp_out":
            w = ex.down_proj
        else:
            w = ex.gate_up_proj if self.gated else ex.up_proj
        w = w.detach().float()
        if not ex.is_transposed:
            w = w.transpose(-1, -2)
        if module != "mlp_out" and self.gated:
            w = _split_gate_up(w, ex.is_concatenated)[0 if module == "mlp_gate" else 1]
        return w.clone()

    @torch.no_grad()
    def expert_inputs(self, x: Float[Tensor, " d_model"]) -> tuple[list[int], Tensor, Tensor]:
        """For one token's block input x: the experts it is routed to, their weights ``[top_k]`` and
        the inputs of their down projections ``h^e [top_k, d_expert]`` (fp32; HF router and gate)."""
        ex = self.experts
        _, weights, idx = self.router(x[None].to(self.router.weight.dtype))
        hs = []
        for e in idx[0].tolist():
            w_in = ex.gate_up_proj[e] if self.gated else ex.up_proj[e]
            b_in = _bias(ex, "gate_up_proj_bias" if self.gated else "up_proj_bias", e)
            pre = _linear(x[None].to(w_in.dtype), w_in, b_in, ex.is_transposed)
            hs.append((ex._apply_gate(pre) if self.gated else ex.act_fn(pre))[0].float())
        return idx[0].tolist(), weights[0].float(), torch.stack(hs)

    def down_update(self, experts: list[int], h: Tensor, e_t: Tensor, eta: float) -> Tensor:
        """``η h^e ⊗ e_t`` for each listed expert, written into a zero tensor in the layout of the HF
        ``down_proj`` (``[expert, d_model, d_expert]``, or ``[expert, d_expert, d_model]`` transposed)."""
        param = self.experts.down_proj
        update = torch.zeros(param.shape, dtype=torch.float32)
        for j, e in enumerate(experts):
            outer = eta * torch.outer(h[j].cpu(), e_t.cpu())  # TL [d_expert, d_model]
            update[e] = outer if self.experts.is_transposed else outer.T
        return update.to(device=param.device, dtype=param.dtype)

    def factor_parts(self, x: Float[Tensor, "tokens d_model"], g: Float[Tensor, "tokens d_model"],
                     dw: Float[Tensor, "tokens expert"]) -> dict[str, Any]:
        """``{module: (x, δ)}`` for ``mlp_in``/``mlp_gate``/``mlp_out`` (``[expert, tokens, d]``,
        zero rows at tokens not routed to the expert; the x of in/gate is one stride-0 view),
        ``router`` (``x [tokens, d_model]``, ``δ = ∂L/∂logits [tokens, expert]``) and ``routed``
        ``[expert, tokens]`` (bool), from the block input x, ``g = ∂L/∂output`` and
        ``dw = ∂L/∂(routing weights)`` at the same tokens (see the module docstring)."""
        d_logits, weights, idx = self._router_vjp(x, dw)
        n, E = x.shape[0], self.n_experts
        routed = routed_mask(idx, E)
        w = torch.zeros(n, E).scatter_(-1, idx.long().cpu(), weights.float().cpu()).to(x.device)
        H, D_gate, D_up = (x.new_zeros(E, n, self.d_expert) for _ in range(3))
        D_out = x.new_zeros(E, n, x.shape[1])
        for e in range(E):
            tok = routed[e].nonzero()[:, 0].to(x.device)
            if len(tok):
                D_out[e, tok] = w[tok, e, None] * g[tok]
                H[e, tok], d_gate, D_up[e, tok] = self._expert_vjp(e, x[tok], D_out[e, tok])
                if d_gate is not None:
                    D_gate[e, tok] = d_gate
        shared_x = x.expand(E, *x.shape)
        parts = {"mlp_in": (shared_x, D_up), "mlp_out": (H, D_out), "router": (x, d_logits), "routed": routed}
        if self.gated:
            parts["mlp_gate"] = (shared_x, D_gate)
        return parts

    def _expert_vjp(self, e: int, x: Tensor, d_out: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """(h, δ_gate, δ_up) of expert e at inputs x given δ at its down projection's output."""
        ex = self.experts
        dtype = ex.down_proj.dtype
        w_in = ex.gate_up_proj[e] if self.gated else ex.up_proj[e]
        b_in = _bias(ex, "gate_up_proj_bias" if self.gated else "up_proj_bias", e)
        with torch.enable_grad():
            pre = _linear(x.to(dtype), w_in, b_in, ex.is_transposed).detach().requires_grad_(True)
            h = ex._apply_gate(pre) if self.gated else ex.act_fn(pre)
            out = _linear(h, ex.down_proj[e], _bias(ex, "down_proj_bias", e), ex.is_transposed)
            (d_pre,) = torch.autograd.grad(out, pre, d_out.to(out.dtype))
        d_pre = d_pre.float()
        if not self.gated:
            return h.detach().float(), None, d_pre
        d_gate, d_up = _split_gate_up(d_pre, ex.is_concatenated)
        return h.detach().float(), d_gate, d_up

    def _router_vjp(self, x: Tensor, dw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(∂L/∂logits, top-k weights, top-k indices): the HF router re-run on x, its logits made
        a leaf where its ``F.linear`` returns them, and ∂L/∂w pulled back through its own
        softmax / top-k / renormalisation."""
        mode = _LeafLogits(self.router.weight)
        with torch.enable_grad(), mode:
            _, weights, idx = self.router(x.to(self.router.weight.dtype))
        if len(mode.leaves) != 1:
            raise TLBackwardError(
                f"the router {type(self.router).__name__} of layer {self.layer} did not compute its logits with "
                "one F.linear on its weight, so ∂L/∂logits cannot be read; router factors are not supported "
                "for it", argument="model")
        (d_logits,) = torch.autograd.grad(weights, mode.leaves[0], dw.gather(-1, idx.long()).to(weights.dtype),
                                          allow_unused=True)
        if d_logits is None:
            d_logits = torch.zeros_like(mode.leaves[0])
        return d_logits.float(), weights.detach(), idx


class _LeafLogits(TorchFunctionMode):
    """Within the block: ``F.linear(·, weight, …)`` returns a fresh leaf (the router logits)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight, self.leaves = weight, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            out = out.detach().requires_grad_(True)
            self.leaves.append(out)
        return out


def _linear(x: Tensor, w: Tensor, b: Tensor | None, transposed: bool) -> Tensor:
    out = x @ w if transposed else F.linear(x, w)
    return out if b is None else out + b


def _bias(experts: nn.Module, name: str, e: int) -> Tensor | None:
    b = getattr(experts, name, None) if getattr(experts, "has_bias", False) else None
    return None if b is None else b[e]


def _split_gate_up(t: Tensor, concatenated: bool) -> tuple[Tensor, Tensor]:
    """(gate, up) halves of the last axis: ``[gate | up]`` when concatenated, else interleaved."""
    if concatenated:
        return t.chunk(2, dim=-1)
    return t[..., ::2], t[..., 1::2]


def moe_layer(mlp: Any, layer: int) -> MoELayer | None:
    """The :class:`MoELayer` of a bridged MLP, None for a dense MLP; refuses sparse layers it
    cannot read exactly (unverified block class, no router bridge, experts without batched weights)."""
    if not isinstance(mlp, MoEBridge):
        return None
    block = unwrap_bridge(mlp)
    name = type(block).__name__
    if mlp.bound_dense:
        raise TLBackwardError(f"layer {layer} is a dense MLP inside a mixture-of-experts stack ({name}); its "
                              "factors are not supported yet: pass layers= without it", argument="layers")
    verified = tuple(getattr(sys.modules.get(mod), cls, None) for mod, cls in VERIFIED_BLOCKS.items())
    if not isinstance(block, tuple(c for c in verified if isinstance(c, type))):
        raise TLBackwardError(
            f"layer {layer}: expert factors are verified on Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE and GPT-OSS "
            f"blocks, whose output is the experts' routed sum; {name} is not one of them", argument="model")
    routers = [c for c in mlp.children() if isinstance(c, MoERouterBridge)]
    experts = unwrap_bridge(getattr(block, "experts", None) or nn.Module())
    if len(routers) != 1 or getattr(routers[0], "weights_index", None) is None or \
            not hasattr(experts, "down_proj") or getattr(experts, "has_post_expert_norm", False):
        raise TLBackwardError(f"layer {layer}: {name} has no single router bridge with routing weights, or "
                              "its experts are not batched 3-D weights without a post-expert norm",
                              argument="model")
    router = routers[0]
    hf_router = router.original_component
    gated = bool(getattr(experts, "has_gate", True))
    d_expert = experts.down_proj.shape[-1 if not experts.is_transposed else -2]
    return MoELayer(layer=layer, experts=experts, router=hf_router, n_experts=int(experts.num_experts),
                    top_k=int(hf_router.top_k), d_expert=int(d_expert), gated=gated,
                    hooks=(mlp.hook_in.name, mlp.hook_out.name, router.hook_expert_weights.name),
                    shared=shared_linears(mlp))


def shared_linears(mlp: nn.Module) -> tuple[tuple[str, str, str], ...]:
    """``(module, hook_in, hook_out)`` for each :data:`SHARED_MODULES` map bridged inside ``mlp``:
    a ``LinearBridge`` in a ``GatedMLPBridge`` child (the shared expert) or a direct one (its gate)."""
    children = dict(mlp.named_children())
    found = []
    for module, (child, inner) in SHARED_MODULES.items():
        c = children.get(child)
        if inner is not None:
            c = dict(c.named_children()).get(inner) if isinstance(c, GatedMLPBridge) else None
        if isinstance(c, LinearBridge):
            found.append((module, c.hook_in.name, c.hook_out.name))
    return tuple(found)


def has_moe(model: Any) -> bool:
    """True when any block of the bridge has a sparse (``MoEBridge``) MLP."""
    return any(isinstance(getattr(block, "mlp", None), MoEBridge) for block in model.blocks)


def has_shared_expert(model: Any) -> bool:
    """True when any sparse MLP of the bridge has a bridged shared expert (:func:`shared_linears`)."""
    return any(isinstance(getattr(block, "mlp", None), MoEBridge) and shared_linears(block.mlp)
               for block in model.blocks)


def refuse_moe_neurons(model: Any, layers: list[int], feature: str) -> None:
    """Refuse ``feature`` (a method drawing an MLP's neurons: W_in columns, W_out rows, hook_post)
    on mixture-of-experts layers, naming why and what works there instead."""
    sparse = [l for l in layers if isinstance(getattr(model.blocks[l], "mlp", None), MoEBridge)]
    if not sparse:
        return
    dense = not all(isinstance(block.mlp, MoEBridge) for block in model.blocks)
    block = type(unwrap_bridge(model.blocks[sparse[0]].mlp)).__name__
    where = f"layer{'s' * (len(sparse) > 1)} {', '.join(map(str, sparse))} ({block})"
    raise TLBackwardError(
        f"{feature} is not available on mixture-of-experts layers: per-expert neurons routed per token, not one "
        "neuron set; use expert_lens or gradient_factors(..., modules='all') instead (tl_backward.lens: per-expert "
        "gradient norms and δ projections; per-expert, router and shared-expert factors). "
        f"{feature} reads one dense MLP's neurons (W_in columns, W_out rows, hook_post); sparse: {where}"
        + ("; or pass only dense layers" if dense else ""), argument="layer" if dense else "model")


def routed_mask(idx: Tensor, n_experts: int) -> Bool[Tensor, "expert tokens"]:
    """``[expert, tokens]``: True where a token's top-k indices ``[tokens, top_k]`` hold the expert."""
    mask = torch.zeros(n_experts, idx.shape[0], dtype=torch.bool)
    mask[idx.T.cpu().long(), torch.arange(idx.shape[0]).expand(idx.shape[1], -1)] = True
    return mask
