"""Low-rank factors of weight gradients (Backward Lens, Katz et al., EMNLP 2024; docs/backward_lens.md).

For a token-wise linear map ``z_i = x_i W`` (TransformerLens layout, ``W: [d_in, d_out]``) with
``δ_i = ∂L/∂z_i``::

    ∂L/∂W = Σ_i x_i ⊗ δ_i = Xᵀ Δ          X: [tokens, d_in], Δ: [tokens, d_out]

so the gradient has rank ≤ tokens and is stored as its two factors instead of a dense matrix.
x is read at the bridged module's ``hook_in`` (forward), δ at its ``hook_out`` (backward), from one
:func:`~tl_backward.core.capture.capture` (one forward + one backward, frozen weights).

Attention factors (an extension; the paper covers the MLP matrices only) carry a leading head
axis: ``W_Q/W_K/W_V[h] = Σ_i x_i ⊗ q/k/v_grad[i, h]`` (k/v per *kv* head under GQA) and
``W_O[h] = Σ_i z[i, h] ⊗ δ_i``. The side shared by all heads (x for q/k/v, δ for o) is a stride-0
``expand`` view, so it costs no memory per head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import capture, require_hooks
from tl_backward.core.device import on
from tl_backward.core.metrics import resolve_metric
from tl_backward.errors import TLBackwardError

from .factor_modules import ATTENTION, MODULES, factor_hook_names, factor_hooks, resolve_modules
from .factor_stats import FactorNorms, FactorSVD

__all__ = ["ATTENTION", "MODULES", "Factor", "GradientFactors", "factor_hook_names", "factors_from_cache",
           "gradient_factors", "resolve_modules"]


@dataclass(frozen=True)
class Factor:
    """The gradient of one weight matrix as ``Σ_i x_i ⊗ δ_i`` over the non-padding tokens.

    ``x: [tokens, d_in]``, ``delta: [tokens, d_out]`` for MLP matrices; attention factors add a
    leading head axis (``[head, tokens, d]``; ``factor.head(h)`` gives the 2-D factor of one head).
    ``reconstruct()`` returns the dense gradient in TransformerLens layout (``W_in [d_model, d_mlp]``,
    ``W_out [d_mlp, d_model]``, ``W_Q [head, d_model, d_head]``, ``W_O [head, d_head, d_model]``).

    Mixture-of-experts layers (core/moe.py): ``mlp_in``/``mlp_gate``/``mlp_out`` carry a leading
    *expert* axis instead (``[expert, tokens, d]``, the same token axis, with zero rows where a token
    was not routed to the expert, so ``Σ_i x_i ⊗ δ_i^e`` runs over the tokens routed to e and
    ``reconstruct()`` is ``[expert, d_in, d_out]``: up/gate ``[expert, d_model, d_expert]``, down
    ``[expert, d_expert, d_model]``); ``routed [expert, tokens]`` marks the routing, ``expert(e)``
    gives one expert's factor, ``tokens_of(e)`` its tokens. ``router``: ``W_router [d_model, expert]``;
    a shared expert's ``shared_*`` are 2-D like a dense MLP's (``shared_expert_gate [d_model, 1]``).
    """

    layer: int
    module: str
    x: Float[Tensor, "*head tokens d_in"]
    delta: Float[Tensor, "*head tokens d_out"]
    routed: Bool[Tensor, "expert tokens"] | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        per = " per expert" if self.per_expert else ""
        return (f"Factor(layer {self.layer} {self.module}: ∂L/∂{self.weight_name} {list(self.shape)}{per} "
                f"from {self.n_tokens} tokens)")

    @property
    def per_expert(self) -> bool:
        """True for the experts' factors of a mixture-of-experts layer (leading expert axis)."""
        return self.routed is not None

    def tokens_of(self, e: int) -> Int[Tensor, " routed"]:
        """Token-axis indices of the tokens routed to expert ``e``."""
        return self.routed[self._expert_index(e)].nonzero()[:, 0]

    def expert(self, e: int) -> "Factor":
        """Expert ``e``'s 2-D factor over the same token axis (zero rows where not routed)."""
        e = self._expert_index(e)
        return Factor(self.layer, self.module, self.x[e], self.delta[e])

    def _expert_index(self, e: int) -> int:
        if not self.per_expert:
            raise TLBackwardError(f"{self.module} at layer {self.layer} is not an experts' factor", argument="expert")
        return checks.head_index(e, self.routed.shape[0], "expert", "this layer's experts")

    def projected(self, side: str) -> Float[Tensor, "tokens d"]:
        """The ``side`` ("x" or "delta") the vocabulary lens reads, ``[tokens, d]``: the one shared
        by all heads / experts, or for the experts' δ (down projection) its sum over experts,
        ``Σ_e w_ie·g_i`` (the gradient at the MoE output times the routed weights' total)."""
        v = self.x if side == "x" else self.delta
        if v.ndim == 2:
            return v
        return v.sum(0) if self.per_expert and v.stride(0) != 0 else v[0]

    @property
    def weight_name(self) -> str:
        """The TransformerLens weight this is the gradient of (``W_in``, ``W_Q``, ...)."""
        return MODULES[self.module]

    @property
    def per_head(self) -> bool:
        return self.x.ndim == 3 and not self.per_expert

    @property
    def n_tokens(self) -> int:
        return self.x.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense gradient (TL layout)."""
        return (*self.x.shape[:-2], self.x.shape[-1], self.delta.shape[-1])

    def head(self, h: int) -> "Factor":
        """The 2-D factor of head ``h`` (a kv head for k/v under GQA); of expert ``h`` on MoE layers."""
        if self.per_expert:
            return self.expert(h)
        if not self.per_head:
            raise TLBackwardError(f"{self.module} is not an attention factor: it has no heads; index it as "
                                  "gf[layer, module]", argument="head")
        h = checks.head_index(h, self.x.shape[0], "head", "this factor")
        return Factor(self.layer, self.module, self.x[h], self.delta[h])

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Float[Tensor, "*head d_in d_out"]:
        """The dense gradient ``Xᵀ Δ`` in TL layout."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TLBackwardError(f"dtype must be a floating-point torch.dtype such as torch.float64, got "
                                  f"{dtype!r:.40}", argument="dtype")
        return torch.einsum("...ti,...to->...io", self.x.to(dtype), self.delta.to(dtype))

    def svd(self, k: int | None = None) -> FactorSVD:
        """Top-``k`` singular triplets of ``Xᵀ Δ`` (all ``min(tokens, d_in, d_out)`` if None),
        from the factors, in fp64, never forming the dense matrix.

        With ``X = U_x S_x V_xᵀ``: ``Xᵀ Δ = V_x (S_x U_xᵀ Δ)`` and ``V_x`` has orthonormal columns, so
        the SVD of the small ``[tokens, d_out]`` matrix ``M = S_x U_xᵀ Δ = U_m S V_mᵀ`` gives
        ``Xᵀ Δ = (V_x U_m) S V_mᵀ``.
        """
        k = checks.count(k, "k", minimum=1, none_ok=True)
        X, D = self.x.double(), self.delta.double()
        Ux, Sx, Vxh = torch.linalg.svd(X, full_matrices=False)
        M = Sx[..., :, None] * (Ux.transpose(-1, -2) @ D)
        Um, S, Vmh = torch.linalg.svd(M, full_matrices=False)
        U = Vxh.transpose(-1, -2) @ Um
        V = Vmh.transpose(-1, -2)
        if k is not None:
            U, S, V = U[..., :k], S[..., :k], V[..., :k]
        return FactorSVD(U, S, V)

    def rank(self, rtol: float | None = None) -> Int[Tensor, "*head"]:
        """Numerical rank of ``Xᵀ Δ`` in fp64: #{σ > rtol·σ_max}, with ``torch.linalg.matrix_rank``'s
        default ``rtol = max(d_in, d_out)·eps(fp64)`` (the dense matrix's singular values)."""
        rtol = checks.finite_float(rtol, "rtol", minimum=0.0, none_ok=True)
        S = self.svd().S
        if rtol is None:
            rtol = max(self.x.shape[-1], self.delta.shape[-1]) * torch.finfo(torch.float64).eps
        smax = S.max(-1, keepdim=True).values if S.shape[-1] else torch.zeros(*S.shape[:-1], 1, device=S.device)
        return ((S > rtol * smax) & (S > 0)).sum(-1)

    def norms(self) -> FactorNorms:
        X, D = self.x.double(), self.delta.double()
        nx, nd = X.norm(dim=-1), D.norm(dim=-1)
        # ‖XᵀΔ‖_F² = Σ_ij (x_i·x_j)(δ_i·δ_j): two [tokens, tokens] Grams instead of the dense matrix.
        gram = (X @ X.transpose(-1, -2)) * (D @ D.transpose(-1, -2))
        return FactorNorms(x=nx, delta=nd, term=nx * nd, grad=gram.sum((-1, -2)).clamp(min=0).sqrt())

    def sgd_output_change(self, token: int, lr: float) -> Float[Tensor, "*head tokens d_out"]:
        """Exact change of this module's output at every token after the one-token SGD step
        ``W ← W − lr·x_t ⊗ δ_t`` (all other weights fixed, same input): ``−lr (x_j·x_t) δ_t``.

        At ``j = t`` this is the paper's *imprint* (W_in) / *shift* (W_out): ``−lr‖x_t‖² δ_t``.
        """
        token = checks.index(token, self.n_tokens, "token", "token", "this factor (non-padding tokens)")
        lr = checks.finite_float(lr, "lr", hint="the SGD learning rate")
        xt, dt = self.x[..., token, :], self.delta[..., token, :]
        overlap = torch.einsum("...ji,...i->...j", self.x, xt)
        return -lr * overlap[..., :, None] * dt[..., None, :]

    def nbytes(self) -> int:
        """Bytes held by the factors (shared / expanded storage counted once)."""
        return _unique_bytes([self.x, self.delta])


@dataclass(frozen=True)
class GradientFactors:
    """Factors of every requested weight gradient from one backward pass.

    ``gf[layer, module]`` -> :class:`Factor` (negative layers count from the end);
    ``gf[layer, module, head]`` -> that head's 2-D factor. The token axis of every factor runs over
    the non-padding (batch, position) pairs in row-major order: ``positions[i] = (b, p)``.
    ``last_logits [batch, d_vocab]``: the model's logits at each row's last prompt position, from
    the same forward pass (its prediction there).
    """

    factors: dict[tuple[int, str], Factor]
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    n_layers: int
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    positions: Int[Tensor, "tokens 2"]
    str_tokens: list[list[str]]
    metric: Float[Tensor, ""]
    gated_mlp: bool = field(default=False, repr=False)
    last_logits: Float[Tensor, "batch d_vocab"] | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        B, T = self.tokens.shape
        return (f"GradientFactors({len(self.factors)} factors: {len(self.layers)} layers × "
                f"{', '.join(self.modules)}; batch {B} × {T} tokens ({self.n_tokens} real), "
                f"metric {float(self.metric):.4g})")

    def __getitem__(self, key: tuple) -> Factor:
        if not isinstance(key, tuple) or len(key) not in (2, 3):
            raise KeyError("index GradientFactors as gf[layer, module] or gf[layer, module, head]")
        layer, module = key[0], key[1]
        if checks.is_int(layer) and -self.n_layers <= layer < 0:  # negative counts from the end
            layer = int(layer) % self.n_layers
        if module not in self.modules:
            raise KeyError(f"module {module!r} was not computed; available: {list(self.modules)}")
        if (layer, module) not in self.factors:
            raise KeyError(f"layer {key[0]!r} was not computed; available layers: {list(self.layers)}")
        factor = self.factors[(layer, module)]
        return factor.head(key[2]) if len(key) == 3 else factor

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self.factors)

    def __len__(self) -> int:
        return len(self.factors)

    def items(self):
        return self.factors.items()

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    @property
    def token_strs(self) -> list[str]:
        """Token strings along the factors' token axis."""
        return [self.str_tokens[b][p] for b, p in self.positions.tolist()]

    def select_tokens(self, tokens: slice | Sequence[int]) -> "GradientFactors":
        """The factors restricted to some entries of the token axis (Python-style indices or a slice,
        e.g. ``slice(-16, None)`` for the last 16 real tokens), in the given order.

        Each factor becomes ``Σ_{i ∈ tokens} x_i ⊗ δ_i`` -- the gradient's share from those tokens,
        not the full gradient -- so its norms and ``reconstruct()`` change; use it to project or
        show fewer tokens (the projection costs one readout per token). Tensors that factors shared
        (q/k/v's input, the expanded side of attention factors) stay shared. ``mask`` then marks
        the kept (batch, pos) pairs.
        """
        n = self.n_tokens
        if isinstance(tokens, slice):
            idx = list(range(*tokens.indices(n)))
        elif isinstance(tokens, (list, tuple, range)) or (isinstance(tokens, Tensor) and tokens.ndim == 1):
            idx = [checks.index(t, n, "tokens", "token", "these factors (non-padding tokens)") for t in tokens]
        else:
            raise TLBackwardError(f"tokens must be a slice or a sequence of token-axis indices, got "
                                  f"{type(tokens).__name__}", argument="tokens")
        if not idx or len(set(idx)) != len(idx):
            raise TLBackwardError(f"tokens must select at least one token, each once; got {len(idx)} entries "
                                  f"with {len(set(idx))} distinct", argument="tokens")
        keep = torch.tensor(idx, dtype=torch.long)
        memo: dict[tuple, Tensor] = {}

        def pick(t: Tensor) -> Tensor:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key not in memo:
                if t.ndim == 3 and t.stride(0) == 0:  # a head-expanded view: pick once, expand again
                    memo[key] = pick(t[0]).expand(t.shape[0], len(idx), t.shape[-1])
                else:
                    memo[key] = t.index_select(-2, keep.to(t.device))
            return memo[key]

        factors = {k: Factor(f.layer, f.module, pick(f.x), pick(f.delta),
                             None if f.routed is None else f.routed[:, keep]) for k, f in self.factors.items()}
        positions = self.positions[keep]
        mask = torch.zeros_like(self.mask)
        mask[positions[:, 0], positions[:, 1]] = True
        return dataclasses.replace(self, factors=factors, positions=positions, mask=mask)

    def nbytes(self) -> int:
        """Bytes held by all factors (shared storage counted once)."""
        return _unique_bytes([t for f in self.factors.values() for t in (f.x, f.delta)])

    def dense_nbytes(self) -> int:
        """Bytes the dense fp32 gradients of the same matrices would take."""
        total = 0
        for f in self.factors.values():
            n = 1
            for s in f.shape:
                n *= s
            total += 4 * n
        return total


def gradient_factors(
    model: Any,
    input: Any,
    target: Any = None,
    *,
    metric: Any = None,
    modules: str | Sequence[str] = ("mlp_in", "mlp_out"),
    layers: int | Sequence[int] | None = None,
    prepend_bos: bool | None = None,
) -> GradientFactors:
    """Factors ``(x_i, δ_i)`` of ``∂metric/∂W`` for the chosen weight matrices, one forward+backward.

    Args:
        model: a reconstructing ``TransformerBridge`` (GPT-2, GPT-NeoX, Llama/Qwen2/Mistral).
        input: a prompt, a list of prompts (right-padded; padding is dropped from the token axis)
            or token ids ``[batch, pos]``.
        target / metric: exactly one: a target (its NLL at each row's last prompt position,
            summed over the batch; multi-token targets are teacher-forced) or a callable
            ``(logits, tokens) -> scalar``.
        modules: any of ``mlp_in`` (W_in; the up projection of gated MLPs), ``mlp_gate``
            (W_gate), ``mlp_out`` (W_out), ``q``, ``k``, ``v``, ``o`` (per head), ``router``
            (mixture-of-experts layers: the router's logits map), ``shared_in`` / ``shared_gate`` /
            ``shared_out`` / ``shared_expert_gate`` (Qwen2-MoE's shared expert and its sigmoid
            gate ``[d_model, 1]``; plain 2-D factors, the gate's σ inside δ), or ``"all"``. On MoE layers the
            three MLP modules are the experts' up / gate / down projections, with an expert axis
            (:class:`Factor`); the router is never taken for a gate.
        layers: None for all layers, an int, or a list.
        prepend_bos: None uses the model's default; the papers differ, so be explicit.

    Returns:
        :class:`GradientFactors`; ``gf[l, m].reconstruct()`` equals autograd's ``∂metric/∂W``.
    """
    metric = resolve_metric(target, metric)
    cache = capture(model, input, metric, names=factor_hook_names(model, modules, layers), prepend_bos=prepend_bos)
    return factors_from_cache(model, cache, modules=modules, layers=layers)


def factors_from_cache(model: Any, cache: Any, *, modules: str | Sequence[str] = ("mlp_in", "mlp_out"),
                       layers: int | Sequence[int] | None = None) -> GradientFactors:
    """:func:`gradient_factors` read off a :func:`~tl_backward.capture` cache holding
    :func:`factor_hook_names`: ``x_i`` = the cached input, ``δ_i`` = the cached output gradient, at
    the real (unpadded) tokens. Lets several analyses share one forward + backward."""
    ad = get_adapter(model)
    mods, lays = resolve_modules(ad, modules), ad.layers(layers)
    hooks = factor_hooks(ad, mods, lays)
    require_hooks(cache, [n for pair in hooks.values() for n in pair], "factor_hook_names(model, modules, layers)")
    mask = cache.mask
    factors: dict[tuple[int, str], Factor] = {}
    seen_x: dict[int, list[Tensor]] = {}  # per layer: x tensors already kept (q/k/v, in/gate share one)
    moe_parts: dict[int, dict[str, Any]] = {}
    for (l, m), names in hooks.items():
        if len(names) == 3:  # a mixture-of-experts layer: expert axis, zero rows where not routed
            parts = moe_parts.get(l) or moe_parts.setdefault(l, _moe_parts(ad.moe(l), cache, names))
            factors[(l, m)] = Factor(l, m, *parts[m], parts["routed"] if m != "router" else None)
            continue
        x, d = _share(_at(cache[names[0]], mask), seen_x.setdefault(l, [])), _at(cache.grad(names[1]), mask)
        if m in ("q", "k", "v"):  # x [n, d_model], δ [n, head, d_head]
            d = d.permute(1, 0, 2).contiguous()
            x = x.expand(d.shape[0], *x.shape)
        elif m == "o":  # x = z [n, head, d_head], δ [n, d_model]
            x = x.permute(1, 0, 2).contiguous()
            d = d.expand(x.shape[0], *d.shape)
        factors[(l, m)] = Factor(l, m, x, d)
    b_idx, p_idx = mask.nonzero(as_tuple=True)
    return GradientFactors(
        factors=factors, layers=tuple(lays), modules=mods, n_layers=ad.n_layers,
        tokens=cache.tokens, mask=mask, last=cache.last, positions=torch.stack([b_idx, p_idx], -1),
        str_tokens=cache.str_tokens, metric=cache.metric, gated_mlp=ad.gated_mlp, last_logits=cache.last_logits,
    )


def _moe_parts(moe: Any, cache: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """:meth:`tl_backward.core.moe.MoELayer.factor_parts` at the cache's real tokens."""
    x_name, g_name, w_name = names  # the router hooks see [batch·pos, expert]
    return moe.factor_parts(_at(cache[x_name], cache.mask), _at(cache.grad(g_name), cache.mask),
                            _at(cache.grad(w_name), cache.mask))


def _at(t: Tensor, mask: Tensor) -> Tensor:
    """``t`` at the real tokens ``[n, ...]``, on ``t``'s own (layer's) device; hooks inside a sparse
    block (the router's, the shared expert's) see the block's flattened ``[batch·pos, ...]`` tokens,
    in row-major (b, p) order."""
    t = t if t.shape[:2] == mask.shape else t.reshape(*mask.shape, *t.shape[1:])
    return t[on(mask, t)]


def _share(x: Tensor, seen: list[Tensor]) -> Tensor:
    """Reuse an identical tensor already kept for this layer (q/k/v and in/gate read the same input)."""
    for other in seen:
        if other.shape == x.shape and torch.equal(other, x):
            return other
    seen.append(x)
    return x


def _unique_bytes(tensors: Sequence[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
