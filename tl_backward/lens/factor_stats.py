"""Result types of :class:`tl_backward.lens.factors.Factor`: its norms and its thin SVD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass(frozen=True)
class FactorNorms:
    """Norms of a factor: per token ``x`` = ‖x_i‖, ``delta`` = ‖δ_i‖, ``term`` = ‖x_i ⊗ δ_i‖_F =
    ‖x_i‖·‖δ_i‖, and ``grad`` = ‖Σ_i x_i ⊗ δ_i‖_F (via Gram matrices, fp64). Shapes ``[tokens]``
    (``[head, tokens]`` / ``[head]`` for attention)."""

    x: Float[Tensor, "*head tokens"]
    delta: Float[Tensor, "*head tokens"]
    term: Float[Tensor, "*head tokens"]
    grad: Float[Tensor, "*head"]

    def __repr__(self) -> str:
        g = self.grad.reshape(-1)
        what = f"‖∂L/∂W‖_F {float(g[0]):.4g}" if g.numel() == 1 else f"‖∂L/∂W‖_F per head, max {float(g.max()):.4g}"
        return f"FactorNorms({self.x.shape[-1]} tokens, {what})"


@dataclass(frozen=True)
class FactorSVD:
    """``∂L/∂W ≈ U diag(S) Vᵀ`` (exact when ``k`` ≥ rank). ``U: [*head, d_in, k]``,
    ``S: [*head, k]`` (descending), ``V: [*head, d_out, k]``; fp64."""

    U: Float[Tensor, "*head d_in k"]
    S: Float[Tensor, "*head k"]
    V: Float[Tensor, "*head d_out k"]

    def __repr__(self) -> str:
        smax = f", σ_max {float(self.S.max()):.4g}" if self.S.numel() else ""
        return f"FactorSVD(k={self.S.shape[-1]}, U {list(self.U.shape)}, V {list(self.V.shape)}{smax})"

    def reconstruct(self) -> Float[Tensor, "*head d_in d_out"]:
        return torch.einsum("...ik,...k,...ok->...io", self.U, self.S, self.V)
