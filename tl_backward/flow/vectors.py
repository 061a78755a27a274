"""The d_model vectors behind VISIT nodes, forward and backward (pure tensor math, no hooks).

Everything is at one layer and one position p of one prompt; shapes use h = query heads,
e = d_head, d = d_model, m = d_mlp, P = key positions 0..p. Weights are in TransformerLens layout
and already expanded from key/value heads to query heads (GQA: head j reads kv head j // group).

Forward (VISIT, Katz & Belinkov 2023)::

    qkv_j / q_j      = W_K[j] @ q_j                      memory key (j,i) = W_Q[j] @ k'_{j,i}
    memory value     = v_{j,i} @ W_O[j]                  head output A_j  = z_j @ W_O[j]
    W_O neuron r     = W_O[r]   (row r of W_O as [h·e, d])   MLP key / value i = W_in[:, i] / W_out[i]

with k'_{j,i} the key *as the query at p sees it*: k_i for absolute-position models, and
R_p⁻¹ R_i k_i for RoPE (so that q_p · k'_{j,i} = s · score[p, i] exactly).

Backward (tl_backward's extension; g = ∂L/∂·, δ = the Backward Lens factor at p)::

    q_j              = W_K[j] @ g_q[p, j]
    memory key (j,i) = W_Q[j] @ (RA_j[p, i] · q_{p,j})      (∂L/∂k' through query p only)
    memory value     = (P_j[p, i] · g_z[p, j]) @ W_O[j]      (∂L/∂v_i through query p only)
    A_j              = g_z[p, j] @ W_O[j]
    qkv_j            = W_Q[j] g_q[p,j] + W_K[j] g_k⁽ʲ⁾[p] + W_V[j] g_v⁽ʲ⁾[p]
                       (the gradient attn_in[p] receives through head j; Σ_j = grad attn_in[p])
    W_O row r        = z_p[r] · g_attn_out[p]                (∂L/∂W_O[r] restricted to p)
    MLP key i        = g_pre[p, i] · mlp_in[p]               (∂L/∂W_in[:, i] restricted to p)
    MLP value i      = h_p[i] · g_mlp_out[p]                 (∂L/∂W_out[i] restricted to p)

RA_j[p, i] = ∂L/∂(q·kᵀ)_j[p, i] (Reversed Attention; ∂L/∂score / s with s the attention scale),
read through the layer's route (:meth:`tl_backward.flow.rules.LayerTensors.reversed_attention`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core.adapter import apply_rotary


# ------------------------------------------------------------------------------------ rotations
def rotate(x: Float[Tensor, "pos head e"], cos: Float[Tensor, "pos r"], sin: Float[Tensor, "pos r"],
           inverse: bool = False) -> Float[Tensor, "pos head e"]:
    """RoPE rotation R_pos x (``inverse``: R_pos⁻¹ x, i.e. rotation by −θ)."""
    return apply_rotary(x[None], cos[None], (-sin if inverse else sin)[None])[0]


def keys_in_query_frame(k: Float[Tensor, "pos head e"], p: int, cos: Tensor | None,
                        sin: Tensor | None) -> Float[Tensor, "pos head e"]:
    """k'_i = R_p⁻¹ R_i k_i (identity without RoPE): q_p · k'_i equals the rotated dot product."""
    if cos is None:
        return k
    rot = rotate(k, cos, sin)
    n = k.shape[0]
    return rotate(rot, cos[p:p + 1].expand(n, -1), sin[p:p + 1].expand(n, -1), inverse=True)


def key_grad_share(ra: Float[Tensor, "head query key"], q: Float[Tensor, "query head e"], p: int,
                   cos: Tensor | None, sin: Tensor | None) -> Float[Tensor, "head e"]:
    """Head j's share of ∂L/∂k[p] (unrotated key): R_pᵀ Σ_q RA_j[q, p] · R_q q_{q,j}."""
    if cos is None:
        return torch.einsum("hq,qhe->he", ra[:, :, p], q)
    rot_q = rotate(q, cos, sin)
    summed = torch.einsum("hq,qhe->he", ra[:, :, p], rot_q)
    return rotate(summed[None], cos[p:p + 1], sin[p:p + 1], inverse=True)[0]


def value_grad_share(pattern: Float[Tensor, "head query key"], g_z: Float[Tensor, "query head e"],
                     p: int) -> Float[Tensor, "head e"]:
    """Head j's share of ∂L/∂v[p]: Σ_q P_j[q, p] · g_z[q, j]."""
    return torch.einsum("hq,qhe->he", pattern[:, :, p], g_z)


# ------------------------------------------------------------------------------------ vectors
def through_key(W_K: Float[Tensor, "head d e"], x: Float[Tensor, "head e"]) -> Float[Tensor, "head d"]:
    """W_K[j] @ x_j per head (q_j node, forward and backward)."""
    return torch.einsum("hde,he->hd", W_K, x)


def through_out(W_O: Float[Tensor, "head e d"], x: Float[Tensor, "n e"], heads: Tensor) -> Float[Tensor, "n d"]:
    """x_n @ W_O[j_n] (memory values, head outputs)."""
    return torch.einsum("ne,ned->nd", x, W_O[heads])


def qkv_backward(W_Q: Tensor, W_K: Tensor, W_V: Tensor, g_q: Float[Tensor, "head e"],
                 g_k: Float[Tensor, "head e"], g_v: Float[Tensor, "head e"]) -> Float[Tensor, "head d"]:
    """The gradient attn_in[p] receives through head j's query, key and value."""
    return through_key(W_Q, g_q) + through_key(W_K, g_k) + through_key(W_V, g_v)


def signed_selection(scores: Float[Tensor, " n"], n_top: int, n_bottom: int) -> Tensor:
    """Indices of the ``n_top`` largest and ``n_bottom`` smallest signed scores (disjoint; all
    when n_top < 0), sorted by score descending."""
    n = scores.numel()
    if n_top < 0 or n_top + n_bottom >= n:
        return scores.argsort(descending=True)
    order = scores.argsort(descending=True)
    keep = torch.cat([order[:n_top], order[n - n_bottom:] if n_bottom > 0 else order[:0]])
    return keep[scores[keep].argsort(descending=True)]


def top_selection(scores: Float[Tensor, " n"], n: int) -> Tensor:
    """Indices of the ``n`` largest scores (all when n < 0), descending."""
    order = scores.argsort(descending=True)
    return order if n < 0 else order[:n]
