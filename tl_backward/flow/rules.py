"""The rule tables of a VISIT layer: what vector each node carries and what weight each edge has,
forward and backward.

:mod:`tl_backward.flow.topology` says which nodes and edges one layer has and how they connect;
a rule table here fills in the numbers. Each method is one row of the table, named after the node
or edge it computes. :class:`ForwardRules` follows VISIT (Katz & Belinkov 2023): nodes carry
activations and weight rows, edges the norm of what flows along them. :class:`BackwardRules` is
tl_backward's backward twin: nodes carry ∂L/∂activation at p and the Backward Lens weight-gradient
factors restricted to p, edges the gradient flowing along them. The tensor formulas live in
:mod:`tl_backward.flow.vectors`; the tables of both directions are in docs/flow_graphs.md.

Shapes: h = query heads, e = d_head, d = d_model, m = d_mlp, P = key positions 0..p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core.adapter import ModelAdapter
from tl_backward.core.attention_kinds import PatternRoute, ScoreRoute, ValueRoute

from . import vectors as V
from .colors import attention_color, sign_color
from .specs import LayerData, LayerIds, Share, norm_of, positive_multiple, same_vector

# ---- VISIT's edge weights (Katz & Belinkov 2023, VISIT), shared by both directions where used.
FIXED_EDGE_WEIGHT = 7.0            # concat → W_O neuron / b_O, mlp_in → MLP key / MLP bias
MIN_ATTENTION_EDGE_WEIGHT = 0.51   # floor of the memory edges, so weak memories stay visible
ATTENTION_EDGE_SCALE = 10.0        # q → memory key and key → value: max(10·a, 0.51)
QUERY_EDGE_SCALE = 0.2             # qkv → q: 0.2·‖W_K[j] q_j‖
VALUE_EDGE_SCALE = 1.3             # memory value → head output: max(1.3·a·‖v W_O[j]‖, 0.51)
HEAD_EDGE_SCALE = 1.8              # head output → concat: 1.8·‖z_j W_O[j]‖
MLP_ACTIVATION_EDGE_SCALE = 1.5    # MLP key → value: 1.5·|h_i|


class NodeRule(NamedTuple):
    """What a rule puts on a node: its d_model vector, projection-sharing tag, hover note and extra
    hover projections (caption, vector, share)."""

    vector: Tensor
    share: Share | None = None
    note: str = ""
    extra: tuple[tuple[str, Tensor, Share | None], ...] = ()


class EdgeRule(NamedTuple):
    weight: float
    color: str | None = None


@dataclass(frozen=True)
class LayerTensors:
    """One layer's weights (CPU; key/value heads expanded to query heads, head j reads kv head
    j // group) and its activations at position p, plus the raw per-hook tensors of
    :class:`~tl_backward.flow.specs.LayerData`."""

    ids: LayerIds
    p: int
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]
    W_Q: Float[Tensor, "head d e"]
    W_K: Float[Tensor, "head d e"]
    W_V: Float[Tensor, "head d e"]
    W_O: Float[Tensor, "head e d"]
    W_in: Float[Tensor, "d m"]
    W_out: Float[Tensor, "m d"]
    b_O: Float[Tensor, " d"]
    b_in: Float[Tensor, " m"]
    b_out: Float[Tensor, " d"]
    query: Float[Tensor, "head e"]       # unrotated query at p
    keys: Float[Tensor, "P head e"]      # keys as the query at p sees them (k' = R_p⁻¹R_i k_i)
    values: Float[Tensor, "P head e"]
    pattern: Float[Tensor, "head P"]     # attention of p to each key position
    z: Float[Tensor, "head e"]
    mlp_post: Float[Tensor, " m"]        # h = mlp.hook_post at p
    rotary: tuple[Tensor, Tensor] | tuple[None, None]  # cos, sin [pos, rot] (None: absolute positions)
    route: ScoreRoute | ValueRoute | PatternRoute  # where RA = ∂L/∂(q·kᵀ) is read (core/attention_kinds.py)
    attn_scale: float
    d_head: int
    d_model: int
    gated_mlp: bool
    parallel_blocks: bool

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    def reversed_attention(self) -> Float[Tensor, "head query key"]:
        """RA = ∂L/∂(q·kᵀ) of the whole prompt, read through the layer's route: ∂L/∂S / s at an on-path
        hook_attn_scores, else P ⊙ (dP − rowsum(P ⊙ dP)) / s with dP at hook_pattern (boot_native) or
        ∂L/∂z · Vᵀ (HF-delegating bridges, after checking z = P·V in this pass)."""
        route = self.route
        acts = {k: self.acts[k][None] for k in route.activations}
        route.check_forward(acts, self.ids.layer)
        grads = {k: self.grads[k][None] for k in route.gradients}
        return route.logit_grad(acts, grads, self.attn_scale)[0]


def gather_layer(ad: ModelAdapter, data: LayerData, layer: int, p: int,
                 rotary: tuple[Tensor, Tensor] | tuple[None, None]) -> LayerTensors:
    """Read one layer's weights from the adapter and its activations at p from ``data``."""
    a = data.acts
    kv = torch.tensor([ad.kv_head(j) for j in range(ad.n_heads)])
    cos, sin = rotary
    n_key = p + 1
    # A forward graph reads values only: a layer whose gradients are off the path still serves.
    route = (ad.ra_route if data.grads else ad.forward_route)(layer, "flow_graph")
    keys = V.keys_in_query_frame(a["k"][:n_key][:, kv], p, None if cos is None else cos[:n_key],
                                 None if sin is None else sin[:n_key])
    return LayerTensors(
        ids=LayerIds(layer), p=p, acts=a, grads=data.grads,
        W_Q=ad.W_Q(layer).cpu(), W_K=ad.W_K(layer)[kv].cpu(), W_V=ad.W_V(layer)[kv].cpu(),
        W_O=ad.W_O(layer).cpu(), W_in=ad.W_in(layer).cpu(), W_out=ad.W_out(layer).cpu(),
        b_O=ad.b_O(layer).cpu(), b_in=ad.b_in(layer).cpu(), b_out=ad.b_out(layer).cpu(),
        query=a["q"][p], keys=keys, values=a["v"][:n_key][:, kv], pattern=a["pattern"][:, p, :n_key],
        z=a["z"][p], mlp_post=a["mlp_post"][p], rotary=rotary, route=route,
        attn_scale=ad.attn_scale(layer),
        d_head=ad.d_head, d_model=ad.d_model, gated_mlp=ad.gated_mlp, parallel_blocks=ad.parallel_blocks)


class Rules:
    """The rows both directions share; :class:`ForwardRules` and :class:`BackwardRules` add the
    rest, the same rows in each (skeleton, attention, W_O neurons, MLP neurons, biases).

    Pruning scores (set by the subclass): ``head_scores`` [h], ``memory_scores`` [h, P],
    ``wo_scores`` [h·e] (signed), ``mlp_scores`` [m] (signed); ``head_vectors`` [h, d] are the
    head-output node vectors.
    """

    backward: bool
    negative_from_bottom: bool  # label negative-score neurons by their bottom tokens
    skeleton_weight_hooks: dict[str, str]  # skeleton edge role → hook whose norm weights it
    parallel_weight_hooks: dict[str, str]  # overrides for parallel blocks (no resid_mid)
    head_scores: Tensor
    memory_scores: Tensor
    wo_scores: Tensor
    mlp_scores: Tensor
    head_vectors: Tensor

    def __init__(self, tensors: LayerTensors):
        self.tensors = tensors
        self.ids, self.p = tensors.ids, tensors.p
        self.z_flat = tensors.z.reshape(-1)  # z at p as [h·e], the W_O rows' activations

    def _act(self, hook: str) -> Tensor:
        return self.tensors.acts[hook][self.p]

    def _grad(self, hook: str) -> Tensor:
        return self.tensors.grads[hook][self.p]

    def _carried(self, hook: str) -> Tensor:
        """What skeleton nodes and edges carry: the activation (forward) or gradient (backward) at p."""
        return self._grad(hook) if self.backward else self._act(hook)

    # ---- skeleton
    def skeleton_edge(self, role: str) -> float:
        hooks = dict(self.skeleton_weight_hooks)
        if self.tensors.parallel_blocks:
            hooks.update(self.parallel_weight_hooks)
        return norm_of(self._carried(hooks[role]))

    # ---- attention
    def attention_value_edge(self, j: int, i: int) -> EdgeRule:
        prob = float(self.tensors.pattern[j, i])
        return EdgeRule(max(ATTENTION_EDGE_SCALE * prob, MIN_ATTENTION_EDGE_WEIGHT), attention_color(prob))

    # ---- W_O neurons, MLP neurons and biases
    def wo_row_in_edge(self, r: int) -> EdgeRule:
        return EdgeRule(FIXED_EDGE_WEIGHT, sign_color(float(self.wo_scores[r]) > 0))

    def mlp_key_in_edge(self) -> float:
        return FIXED_EDGE_WEIGHT

    def bias_in_edge(self) -> float:
        return FIXED_EDGE_WEIGHT

    def bias_out_edge(self, bias: Tensor) -> float:
        return norm_of(bias)


class ForwardRules(Rules):
    """VISIT's forward graph (Katz & Belinkov 2023): activations and weight rows; edges ‖input‖."""

    backward = False
    negative_from_bottom = True
    skeleton_weight_hooks = dict(ln1="resid_pre", ln2="resid_mid", attn_residual="attn_out",
                                 mlp_residual="mlp_out", skip_pre="resid_pre", skip_mid="resid_mid")
    parallel_weight_hooks = dict(ln2="resid_pre")

    def __init__(self, tensors: LayerTensors):
        super().__init__(tensors)
        W_O = tensors.W_O
        self.qkv_vectors = V.through_key(tensors.W_K, tensors.query)                 # W_K[j] q_j [h, d]
        self.head_vectors = V.through_out(W_O, tensors.z, torch.arange(tensors.n_heads))  # z_j W_O[j]
        self.head_scores = self.head_vectors.norm(dim=-1)
        self.memory_scores = tensors.pattern
        self.wo_scores = self.z_flat * W_O.reshape(-1, tensors.d_model).norm(dim=-1)   # z_r ‖W_O[r]‖
        self.mlp_scores = tensors.mlp_post * tensors.W_out.norm(dim=-1)              # h_i ‖W_out[i]‖
        self.attn_in_norm = norm_of(self._act("attn_in"))

    def skeleton_node(self, name: str, hook: str) -> NodeRule:
        return NodeRule(self._act(hook))

    # ---- attention
    def qkv_node(self, j: int) -> NodeRule:
        """W_K[j] q_j; the hover adds this token's key and value (the memory (j, p) computation)."""
        tensors, hj, p = self.tensors, self.ids.head(j), self.p
        extra = (("key of this token", tensors.W_Q[j] @ tensors.keys[p, j], same_vector(f"{hj}.k{p}")),
                 ("value of this token", tensors.values[p, j] @ tensors.W_O[j], same_vector(f"{hj}.v{p}")))
        return NodeRule(self.qkv_vectors[j], same_vector(f"{hj}.q"), extra=extra)

    def query_node(self, j: int) -> NodeRule:
        return NodeRule(self.qkv_vectors[j], same_vector(f"{self.ids.head(j)}.q"))  # = the qkv node

    def qkv_edge(self, j: int) -> float:
        return self.attn_in_norm

    def query_edge(self, j: int) -> float:
        return QUERY_EDGE_SCALE * norm_of(self.qkv_vectors[j])

    def memory_key_node(self, j: int, i: int) -> NodeRule:
        """W_Q[j] k'_{j,i}."""
        key = self.tensors.W_Q[j] @ self.tensors.keys[i, j]
        return NodeRule(key, same_vector(f"{self.ids.head(j)}.k{i}"), self.memory_note(j, i))

    def memory_value_node(self, j: int, i: int) -> NodeRule:
        """v_{j,i} W_O[j]."""
        value = self.tensors.values[i, j] @ self.tensors.W_O[j]
        return NodeRule(value, same_vector(f"{self.ids.head(j)}.v{i}"), self.memory_note(j, i))

    def memory_note(self, j: int, i: int) -> str:
        return f"attention {float(self.tensors.pattern[j, i]):.3f}"

    def attention_key_edge(self, j: int, i: int) -> EdgeRule:
        prob = float(self.tensors.pattern[j, i])
        return EdgeRule(max(ATTENTION_EDGE_SCALE * prob, MIN_ATTENTION_EDGE_WEIGHT), attention_color(prob))

    def value_to_head_edge(self, j: int, i: int, value: Tensor) -> float:
        prob = float(self.tensors.pattern[j, i])
        return max(VALUE_EDGE_SCALE * prob * norm_of(value), MIN_ATTENTION_EDGE_WEIGHT)

    def head_output_node(self, j: int) -> NodeRule:
        return NodeRule(self.head_vectors[j])

    def head_edge(self, j: int) -> float:
        return HEAD_EDGE_SCALE * norm_of(self.head_vectors[j])

    def concat_value(self) -> float:
        return norm_of(self.tensors.z)

    # ---- W_O neurons and b_O
    def wo_row_node(self, r: int) -> NodeRule:
        head, dim = divmod(r, self.tensors.d_head)
        return NodeRule(self.tensors.W_O[head, dim], note=f"z = {float(self.z_flat[r]):+.3g}")

    def wo_row_out_edge(self, r: int) -> float:
        return abs(float(self.wo_scores[r]))

    def attn_bias_node(self) -> NodeRule:
        return NodeRule(self.tensors.b_O)

    # ---- MLP key-value memories and biases
    def _mlp_note(self, i: int) -> str:
        return f"h = {float(self.tensors.mlp_post[i]):+.3g}"

    def mlp_key_node(self, i: int) -> NodeRule:
        return NodeRule(self.tensors.W_in[:, i], note=self._mlp_note(i))

    def mlp_value_node(self, i: int) -> NodeRule:
        return NodeRule(self.tensors.W_out[i], note=self._mlp_note(i))

    def mlp_activation_edge(self, i: int) -> EdgeRule:
        h = float(self.tensors.mlp_post[i])
        return EdgeRule(MLP_ACTIVATION_EDGE_SCALE * abs(h), sign_color(h > 0))

    def mlp_value_edge(self, i: int) -> float:
        return abs(float(self.mlp_scores[i]))

    def mlp_in_bias_node(self) -> NodeRule:
        return NodeRule(self.tensors.b_in @ self.tensors.W_out)

    def mlp_out_bias_node(self) -> NodeRule:
        return NodeRule(self.tensors.b_out)


class BackwardRules(Rules):
    """tl_backward's backward twin: gradients g = ∂L/∂· at p and Backward Lens factors restricted
    to p; edges carry the gradient flowing along them (the LN steps: the LN-branch gradients)."""

    backward = True
    negative_from_bottom = False  # every backward node is labelled from the bottom anyway
    skeleton_weight_hooks = dict(ln1="ln1_in", ln2="ln2_in", attn_residual="attn_out",
                                 mlp_residual="resid_post", skip_pre="attn_out", skip_mid="resid_post")
    parallel_weight_hooks = dict(skip_pre="resid_post")
    # resid_mid = resid_pre + attn_out, so its full gradient is grad(hook_attn_out) (capture reports
    # the same tensor for hook_resid_mid; the alias ln2.hook_in sees only the LN2 branch).
    skeleton_vector_hooks = dict(resid_mid="attn_out")
    # Backward skeleton nodes that are bitwise the same vector as other nodes (b_O, b_out).
    skeleton_shares = dict(attn_out="g_attn_out+", resid_mid="g_attn_out+", mlp_out="g_mlp_out+")

    def __init__(self, tensors: LayerTensors):
        super().__init__(tensors)
        grads, p = tensors.grads, tensors.p
        cos, sin = tensors.rotary
        self.g_query, self.g_z = grads["q"][p], grads["z"][p]                   # [h, e]
        self.ra = tensors.reversed_attention()                                  # [h, Q, K] Reversed Attention
        g_key = V.key_grad_share(self.ra, tensors.acts["q"], p, cos, sin)       # RA · (forward) q
        g_value = V.value_grad_share(tensors.acts["pattern"], grads["z"], p)
        self.qkv_vectors = V.qkv_backward(tensors.W_Q, tensors.W_K, tensors.W_V, self.g_query, g_key, g_value)
        self.head_vectors = V.through_out(tensors.W_O, self.g_z, torch.arange(tensors.n_heads))  # g_z W_O[j]
        self.head_scores = self.head_vectors.norm(dim=-1)
        self.ra_at_p = self.ra[:, p, :p + 1]                                    # [h, P]
        self.memory_scores = self.ra_at_p.abs()
        self.ra_max = float(self.ra_at_p.abs().max()) or 1.0
        self.g_z_flat = self.g_z.reshape(-1)
        self.wo_scores = -self.z_flat * self.g_z_flat                           # −z_r · ∂L/∂z_r
        self.g_mlp_post = grads["mlp_post"][p]
        self.mlp_scores = -tensors.mlp_post * self.g_mlp_post                   # −h_i · ∂L/∂h_i

    def skeleton_node(self, name: str, hook: str) -> NodeRule:
        share = self.skeleton_shares.get(name)
        return NodeRule(self._grad(self.skeleton_vector_hooks.get(name, hook)),
                        None if share is None else same_vector(f"{self.ids.prefix}.{share}"))

    # ---- attention
    def qkv_node(self, j: int) -> NodeRule:
        """W_Q[j] g_q + W_K[j] g_k⁽ʲ⁾ + W_V[j] g_v⁽ʲ⁾: what attn_in[p] receives through head j."""
        return NodeRule(self.qkv_vectors[j])

    def query_node(self, j: int) -> NodeRule:
        return NodeRule(V.through_key(self.tensors.W_K[j:j + 1], self.g_query[j:j + 1])[0])  # W_K[j] g_q

    def qkv_edge(self, j: int) -> float:
        return norm_of(self.qkv_vectors[j])

    def query_edge(self, j: int) -> float:
        return norm_of(self.tensors.W_Q[j] @ self.g_query[j])

    def memory_key_node(self, j: int, i: int) -> NodeRule:
        """W_Q[j] (RA_j[p, i] · q_{p,j}): ∂L/∂k' through query p only."""
        ra = float(self.ra_at_p[j, i])
        key = ra * (self.tensors.W_Q[j] @ self.tensors.query[j])
        return NodeRule(key, positive_multiple(f"{self.ids.head(j)}.WQq", ra), self.memory_note(j, i))

    def memory_value_node(self, j: int, i: int) -> NodeRule:
        """(P_j[p, i] · g_z) W_O[j]: ∂L/∂v_i through query p only."""
        prob = float(self.tensors.pattern[j, i])
        value = (prob * self.g_z[j]) @ self.tensors.W_O[j]
        return NodeRule(value, positive_multiple(f"{self.ids.head(j)}.A", prob), self.memory_note(j, i))

    def memory_note(self, j: int, i: int) -> str:
        return f"attention {float(self.tensors.pattern[j, i]):.3f}, RA {float(self.ra_at_p[j, i]):+.3g}"

    def attention_key_edge(self, j: int, i: int) -> EdgeRule:
        """max(10|RA|/max|RA|, 0.51); blue when −RA > 0 (attending more would lower L)."""
        ra = float(self.ra_at_p[j, i])
        return EdgeRule(max(ATTENTION_EDGE_SCALE * abs(ra) / self.ra_max, MIN_ATTENTION_EDGE_WEIGHT),
                        sign_color(-ra > 0))

    def value_to_head_edge(self, j: int, i: int, value: Tensor) -> float:
        return norm_of(value)

    def head_output_node(self, j: int) -> NodeRule:
        return NodeRule(self.head_vectors[j], same_vector(f"{self.ids.head(j)}.A+"))

    def head_edge(self, j: int) -> float:
        return norm_of(self.head_vectors[j])

    def concat_value(self) -> float:
        return norm_of(self.g_z)

    # ---- W_O neurons and b_O
    def wo_row_node(self, r: int) -> NodeRule:
        """z_p[r] · g_attn_out[p]: ∂L/∂W_O[r] restricted to p."""
        z_r = self.z_flat[r]
        share = positive_multiple(f"{self.ids.prefix}.g_attn_out", float(z_r))
        return NodeRule(z_r * self._grad("attn_out"), share, f"z = {float(z_r):+.3g}")

    def wo_row_out_edge(self, r: int) -> float:
        return abs(float(self.z_flat[r] * self.g_z_flat[r]))

    def attn_bias_node(self) -> NodeRule:
        return NodeRule(self._grad("attn_out"), same_vector(f"{self.ids.prefix}.g_attn_out+"))

    # ---- MLP key-value memories and biases
    def _mlp_note(self, i: int) -> str:
        return f"h = {float(self.tensors.mlp_post[i]):+.3g}, dL/dh = {float(self.g_mlp_post[i]):+.3g}"

    def mlp_key_node(self, i: int) -> NodeRule:
        """δ_pre[p, i] · mlp_in[p]: ∂L/∂W_in[:, i] restricted to p (δ at hook_pre_linear when gated)."""
        delta = self.tensors.grads["mlp_pre"][self.p, i]
        share = positive_multiple(f"{self.ids.prefix}.x_mlp_in", float(delta))
        return NodeRule(delta * self._act("mlp_in"), share, self._mlp_note(i))

    def mlp_value_node(self, i: int) -> NodeRule:
        """h_p[i] · g_mlp_out[p]: ∂L/∂W_out[i] restricted to p."""
        h = float(self.tensors.mlp_post[i])
        return NodeRule(h * self._grad("mlp_out"), positive_multiple(f"{self.ids.prefix}.g_mlp_out", h),
                        self._mlp_note(i))

    def _mlp_flow(self, i: int) -> float:
        return abs(float(self.tensors.mlp_post[i]) * float(self.g_mlp_post[i]))  # |h · ∂L/∂h|

    def mlp_activation_edge(self, i: int) -> EdgeRule:
        return EdgeRule(self._mlp_flow(i), sign_color(float(self.mlp_scores[i]) > 0))

    def mlp_value_edge(self, i: int) -> float:
        return self._mlp_flow(i)

    def mlp_in_bias_node(self) -> NodeRule:
        return NodeRule(self._grad("mlp_pre") @ self.tensors.W_out)

    def mlp_out_bias_node(self) -> NodeRule:
        return NodeRule(self._grad("mlp_out"), same_vector(f"{self.ids.prefix}.g_mlp_out+"))
