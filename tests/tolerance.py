"""How far two fp32 computations of the same quantity may differ, for test comparisons.

Two fp32 evaluations of one formula that differ only in accumulation order (batched vs single rows,
another einsum order, chunked vs whole reductions, TransformerLens vs plain HF, 1 vs 2 threads)
round every partial sum to within eps/2 relative, eps = 2⁻²³ ≈ 1.19e-7. Over a reduction of n
terms the rounding error is at most about n·eps·Σ|xᵢ| and, in practice, a random walk of size about
sqrt(n)·eps·Σ|xᵢ|. The error is set by the size of the *terms*, not of the result: an element that
is a near-cancellation of large terms carries a large relative error. Hence the bound used here:

    |actual − expected| ≤ atol + rtol·|expected|,
    rtol = SAFETY · eps · sqrt(n_terms),   atol = rtol · scale,   scale = max|expected| by default.

``n_terms`` is the number of fp32 terms accumulated into each compared value along its longest
chain of reductions: d_model for one projection; for whole-model forward/backward values, roughly
the sum of the reduction lengths passed through (``MODEL_TERMS`` for the tiny fixture models).
``SAFETY = 8`` leaves a wide margin over what this suite measures (at most ~5 eps·max|expected| for
whole-model comparisons, 1 or 2 threads); yet even for ``MODEL_TERMS`` the bound stays near
2e-5·max|expected|, so a wrong sign, a missing term, a transposed matrix or a missing 1/sqrt(d_head)
(all O(1) relative changes) still fail.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FP32_EPS = torch.finfo(torch.float32).eps
SAFETY = 8.0
# Tiny fixtures (2 layers, d_model 32, d_mlp 128, vocab 72, ≤ 10 positions): reduction lengths along a
# whole forward + backward pass, vocab + 2·(d_model + d_mlp + positions + d_head) ≈ 440.
MODEL_TERMS = 440


def fp32_rtol(n_terms: int) -> float:
    """SAFETY·eps·sqrt(n_terms): the relative spread of an n_terms-long fp32 accumulation."""
    if n_terms < 1:
        raise ValueError(f"n_terms must be >= 1, got {n_terms}")
    return SAFETY * FP32_EPS * math.sqrt(n_terms)


def assert_close_fp32(actual: Tensor, expected: Tensor, *, n_terms: int, what: str = "",
                      scale: float | None = None) -> None:
    """Assert ``actual ≈ expected`` to within fp32 accumulation error (formula in the module docstring).

    Both are compared in float64, so an fp64 reference may be checked against an fp32 result.
    ``scale`` overrides max|expected| as the size of the accumulated terms: pass it when the expected
    values are themselves a cancellation (a difference of probabilities, a row sum that is ~0).
    """
    expected = torch.as_tensor(expected).detach().double()
    actual = torch.as_tensor(actual).detach().double()
    rtol = fp32_rtol(n_terms)
    if scale is None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
    atol = rtol * float(scale)
    note = f"{what}: " if what else ""
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol,
        msg=lambda m: f"{note}{m}\n(fp32 bound for n_terms={n_terms}: rtol={rtol:.2e}, atol={atol:.2e})")
