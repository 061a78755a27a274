"""Backward Lens per expert on mixture-of-experts layers (Katz et al., EMNLP 2024, extended).

Which experts does the gradient write into? For each MoE layer and expert e, with the experts'
factors of :func:`~tl_backward.lens.factors.gradient_factors` (tokens routed to e only;
see tl_backward/core/moe.py)::

    grad_norm[l, e] = ‖∂L/∂W_e‖_F = ‖Σ_{i→e} x_i ⊗ δ_i^e‖_F        (of ``module``, default W_out)
    share[l, e]     = grad_norm[l, e]² / Σ_e' grad_norm[l, e']²
    delta_norm[l, e, i] = ‖δ_i^e‖ = w_ie·‖g_i‖ of the down projection (0 where i is not routed to e)

and each routed δ_i^e of the down projection is read through the same logit lens as the dense
FF2 factor (:meth:`tl_backward.core.readout.Unembed.readout`: ``ln_final`` with its bias, then
W_U and b_U), by its bottom-k (descent adds −δ). δ_i^e is w_ie times the gradient at the MoE
output, so across experts of one token the tokens agree up to that scale (the final norm is
almost scale-invariant); the per-expert information is in the norms and shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.device import result_device, stack_on
from tl_backward.core.metrics import target_nll
from tl_backward.core.readout import Unembed
from tl_backward.errors import TLBackwardError

from .factors import GradientFactors, gradient_factors


@dataclass(frozen=True)
class ExpertLens:
    """Result of :func:`expert_lens`, over MoE ``layers``, ``expert`` and the factors' token axis.

    ``grad_norm``/``share`` ``[layer, expert]``; ``routed``/``delta_norm`` ``[layer, expert, tokens]``;
    ``bottom_ids``/``bottom_logits`` ``[layer, expert, tokens, k]`` (ascending: least probable
    first; ids −1 and logits nan where the token is not routed to the expert) and
    ``target_rank`` ``[layer, expert, tokens]`` (−1 where not routed) of each δ_i^e.
    """

    module: str
    layers: tuple[int, ...]
    grad_norm: Float[Tensor, "layer expert"]
    share: Float[Tensor, "layer expert"]
    routed: Bool[Tensor, "layer expert tokens"]
    delta_norm: Float[Tensor, "layer expert tokens"]
    bottom_ids: Int[Tensor, "layer expert tokens k"]
    bottom_logits: Float[Tensor, "layer expert tokens k"]
    target_rank: Int[Tensor, "layer expert tokens"]

    def __repr__(self) -> str:
        L, E = self.grad_norm.shape
        top = [int(e) for e in self.grad_norm.argmax(-1)]
        return (f"ExpertLens({self.module}: {L} MoE layers × {E} experts × {self.routed.shape[-1]} tokens; "
                f"largest ‖∂L/∂W_e‖ per layer: experts {top})")

    def top_experts(self, layer: int, k: int = 1) -> list[int]:
        """The ``k`` experts of model layer ``layer`` with the largest gradient norm."""
        if layer not in self.layers:
            raise TLBackwardError(f"layer {layer} was not computed; available MoE layers: {list(self.layers)}",
                                  argument="layer")
        k = checks.count(k, "k", minimum=1, maximum=self.grad_norm.shape[1], hint="at most the number of experts")
        return self.grad_norm[self.layers.index(layer)].topk(k).indices.tolist()


def expert_lens(model: Any, input: Any = None, target: Any = None, *, factors: GradientFactors | None = None,
                module: str = "mlp_out", layers: int | Sequence[int] | None = None, top_k: int = 5,
                prepend_bos: bool | None = None) -> ExpertLens:
    """Per-expert gradient norms and the vocabulary projection of each expert's δ (see the module).

    Pass ``input`` and ``target`` (one forward + backward for ``mlp_out`` and ``module``), or
    ``factors`` already computed with ``mlp_out`` and ``module`` and the ``target`` whose rank to
    report. ``layers`` are model layers, all of them MoE layers (None: every MoE layer).
    """
    ad = get_adapter(model)
    if target is None:
        raise TLBackwardError("target is None: pass the target word or its token id", argument="target")
    checks.one_of(module, "module", ("mlp_in", "mlp_gate", "mlp_out"))
    checks.count(top_k, "top_k", minimum=1, maximum=ad.d_vocab, hint="tokens per cell, at most the vocabulary size")
    lays = ad.layers(layers)
    if layers is None:
        lays = [l for l in lays if ad.moe(l) is not None]
    dense = [l for l in lays if ad.moe(l) is None]
    if not lays or dense:
        raise TLBackwardError(f"expert_lens needs mixture-of-experts layers; dense: {dense or 'every layer'}",
                              argument="layers")
    mods = tuple(dict.fromkeys(("mlp_out", module)))
    if factors is None:
        factors = gradient_factors(model, input, metric=target_nll(target), modules=mods, layers=lays,
                                   prepend_bos=prepend_bos)
    elif not isinstance(factors, GradientFactors) or any((l, m) not in factors.factors for l in lays for m in mods):
        raise TLBackwardError(f"factors must be GradientFactors holding {list(mods)} at layers {lays}",
                              argument="factors")
    target_id = ad.target_tokens(target)[0] if not isinstance(target, (list, tuple)) else None
    if target_id is None:
        raise TLBackwardError("expert_lens takes one target for all rows", argument="target")
    return _project(ad, factors, module, lays, int(target_id), top_k)


def _project(ad: Any, gf: GradientFactors, module: str, lays: list[int], target_id: int, k: int) -> ExpertLens:
    device = result_device(ad.model)  # the layers' factors may sit on different devices
    grad_norm = stack_on([gf[l, module].norms().grad.float() for l in lays], device)  # [layer, expert]
    total = grad_norm.pow(2).sum(-1, keepdim=True)
    share = grad_norm.pow(2) / total.clamp(min=1e-30)
    outs = [gf[l, "mlp_out"] for l in lays]
    routed = stack_on([f.routed for f in outs], device)  # [layer, expert, tokens]
    deltas = stack_on([f.delta for f in outs], device)  # [layer, expert, tokens, d_model]
    rows = deltas[routed]  # only routed δ's are projected
    r = Unembed.of(ad).readout(rows, k=k, targets=target_id)
    ids = torch.full((*routed.shape, k), -1, dtype=torch.long)
    logits = torch.full((*routed.shape, k), float("nan"))
    rank = torch.full(routed.shape, -1, dtype=torch.long)
    where = routed.cpu()  # the CPU tables above are indexed on the CPU
    ids[where], logits[where] = r.bottom_ids.cpu(), r.bottom_logits.float().cpu()
    rank[where] = r.ranks[:, 0].cpu()
    return ExpertLens(module=module, layers=tuple(lays), grad_norm=grad_norm, share=share, routed=routed,
                      delta_norm=deltas.norm(dim=-1), bottom_ids=ids, bottom_logits=logits, target_rank=rank)
