"""Per-layer node and edge specifications of a VISIT flow graph, forward or backward (pure
tensor code over tensors already gathered at one position; see :func:`tl_backward.flow.flow_graph`
for the definitions), plus VISIT's colour scales."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tl_backward.core.adapter import ModelAdapter

from . import vectors as V

# VISIT's node palette: 70 stops indexed by floor(rank / |V| · 70).
PALETTE = (["lime"] + ["greenyellow"] + ["yellow"] * 3 + ["dimgrey"] * 53 + ["orangered"] * 3
           + ["red"] * 4 + ["darkred"] * 5)
BIAS_COLOR = "pink"
LN_COLOR = "darkviolet"
SKIP_PRE, SKIP_MID = "rgba(102,0,204,.3)", "rgba(51,102,153,.3)"
POS_COLOR, NEG_COLOR = "blue", "red"


def rank_color(rank0: int, d_vocab: int) -> str:
    """VISIT colour of a 0-based rank: green/yellow = target in the top ~7 %, red = suppressed."""
    return PALETTE[min(len(PALETTE) - 1, max(0, int(math.floor(rank0 / d_vocab * 70))))]


def entropy_grey(bits: float) -> str:
    """greys(H/30) from darkslategrey (specific) to lightgrey (diffuse)."""
    t = min(1.0, max(0.0, bits / 30.0))
    lo, hi = (47, 79, 79), (211, 211, 211)
    return "rgb({},{},{})".format(*(round(a + (b - a) * t) for a, b in zip(lo, hi)))


def attention_color(a: float) -> str:
    """khaki (a=0) → yellow (a=.5) → green (a=1)."""
    a = min(1.0, max(0.0, a))
    stops = ((240, 230, 140), (255, 255, 0), (0, 128, 0))
    lo, hi, t = (stops[0], stops[1], a * 2) if a <= 0.5 else (stops[1], stops[2], a * 2 - 1)
    return "rgb({},{},{})".format(*(round(x + (y - x) * t) for x, y in zip(lo, hi)))



@dataclass
class LayerData:
    """Tensors of one layer for one prompt (batch row 0), keyed by hook kind; ``grads`` only for
    backward graphs."""

    acts: dict[str, Tensor]
    grads: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class NodeSpec:
    id: str
    kind: str
    layer: int
    name: str
    vector: Tensor | None
    value: float
    head: int | None = None
    neuron: int | None = None
    position: int | None = None
    negative: bool = False  # label and colour from the bottom (negative-score neuron)
    bias: bool = False
    extra: list[tuple[str, Tensor, tuple | None]] = field(default_factory=list)  # more hover projections
    note: str = ""
    # Projection sharing: (tag, "same") = bitwise the same vector as the tag's other members;
    # (tag, "dir") = a positive multiple of it (shared only under the normalised lens, where
    # LL(c·u) = LL(u) for c > 0). Backward graphs are full of these (e.g. every W_O row is ±g_attn_out).
    share: tuple[str, str] | None = None


def _dir(tag: str, coef: float) -> tuple[str, str] | None:
    """Share key of coef·u (u named by ``tag``): sign-specific; none for a zero coefficient."""
    return None if coef == 0 else (f"{tag}{'+' if coef > 0 else '-'}", "dir")


@dataclass
class EdgeSpec:
    source: str
    target: str
    kind: str
    weight: float
    color: str | None = None
    entropy_of: str | None = None  # colour = entropy grey of this node's projection


def _norm(x: Tensor) -> float:
    return float(x.norm())


def layer_specs(ad: ModelAdapter, d: LayerData, layer: int, p: int, opts: dict, backward: bool,
                 tokens: list[str], rot: tuple) -> tuple[list[NodeSpec], list[EdgeSpec]]:
    """Nodes and edges of one block (see :func:`flow_graph` for the definitions)."""
    a, g = d.acts, d.grads
    bw = backward
    kv = torch.tensor([ad.kv_head(j) for j in range(ad.n_heads)])
    W_Q, W_K, W_V, W_O = ad.W_Q(layer).cpu(), ad.W_K(layer)[kv].cpu(), ad.W_V(layer)[kv].cpu(), ad.W_O(layer).cpu()
    W_in, W_out, b_O, b_in, b_out = (w.cpu() for w in (ad.W_in(layer), ad.W_out(layer), ad.b_O(layer),
                                                       ad.b_in(layer), ad.b_out(layer)))
    cos, sin = rot
    n_key = p + 1
    q = a["q"][p]                                          # [h, e] unrotated query at p
    keys = V.keys_in_query_frame(a["k"][:n_key][:, kv], p, None if cos is None else cos[:n_key],
                                 None if sin is None else sin[:n_key])  # [P, h, e]
    vals = a["v"][:n_key][:, kv]                            # [P, h, e]
    att = a["pattern"][:, p, :n_key]                        # [h, P]
    z = a["z"][p]                                           # [h, e]
    h_mlp = a["mlp_post"][p]                                # [m]
    mid = None if ad.parallel_blocks else a["resid_mid"][p]
    L = f"L{layer}"
    ids = dict(pre=f"resid{layer}", post=f"resid{layer + 1}", mid=f"{L}.resid_mid", attn_in=f"{L}.attn_in",
               attn_out=f"{L}.attn_out", mlp_in=f"{L}.mlp_in", mlp_out=f"{L}.mlp_out", concat=f"{L}.concat")
    heads_none = torch.zeros(0, dtype=torch.long)
    nodes: list[NodeSpec] = []
    edges: list[EdgeSpec] = []

    if bw:
        g_q, g_z = g["q"][p], g["z"][p]
        ra = g["attn_scores"] / ad.attn_scale(layer)           # [h, Q, K] Reversed Attention
        g_k = V.key_grad_share(ra, a["q"], p, cos, sin)  # RA · (forward) q
        g_v = V.value_grad_share(a["pattern"], g["z"], p)
        qkv_vec = V.qkv_backward(W_Q, W_K, W_V, g_q, g_k, g_v)
        head_vec = V.through_out(W_O, g_z, torch.arange(ad.n_heads))
        head_score = head_vec.norm(dim=-1)
        ra_p = ra[:, p, :n_key]
        mem_score = ra_p.abs()
        z_flat, gz_flat = z.reshape(-1), g_z.reshape(-1)
        wo_score = -z_flat * gz_flat
        g_h = g["mlp_post"][p]
        mlp_score = -h_mlp * g_h
    else:
        qkv_vec = V.through_key(W_K, q)
        head_vec = V.through_out(W_O, z, torch.arange(ad.n_heads))
        head_score = head_vec.norm(dim=-1)
        mem_score = att
        W_O_rows = W_O.reshape(-1, ad.d_model)
        z_flat = z.reshape(-1)
        wo_score = z_flat * W_O_rows.norm(dim=-1)
        mlp_score = h_mlp * W_out.norm(dim=-1)

    # ---- skeleton: activation nodes carry the activation (forward) or its full gradient (backward)
    src = g if bw else a
    for key, name, kind, hook in (("pre", "block_in", "resid", "resid_pre"), ("attn_in", "attn_in", "attn_in", "attn_in"),
                                  ("attn_out", "attn_out", "attn_out", "attn_out"), ("mid", "resid_mid", "resid", "resid_mid"),
                                  ("mlp_in", "mlp_in", "mlp_in", "mlp_in"), ("mlp_out", "mlp_out", "mlp_out", "mlp_out"),
                                  ("post", "block_out", "resid", "resid_post")):
        if key == "mid" and mid is None:
            continue
        # the full resid_mid gradient is grad(hook_attn_out) (capture also returns it for hook_resid_mid)
        vec = src["attn_out" if (bw and key == "mid") else hook][p]
        share = {"attn_out": (f"{L}.g_attn_out+", "same"), "mid": (f"{L}.g_attn_out+", "same"),
                 "mlp_out": (f"{L}.g_mlp_out+", "same")}.get(key) if bw else None
        nodes.append(NodeSpec(ids[key], kind, layer, name, vec, _norm(vec), share=share))
    # edge weights: forward = norm of the edge's input; backward = norm of the gradient crossing it
    n = lambda k: _norm(src[k][p])  # noqa: E731
    if bw:
        w = dict(ln1=n("ln1_in"), ln2=n("ln2_in"), attn_res=n("attn_out"), mlp_res=n("resid_post"),
                 skip_pre=n("resid_post") if mid is None else n("attn_out"), skip_mid=n("resid_post"))
    else:
        w = dict(ln1=n("resid_pre"), ln2=n("resid_pre") if mid is None else n("resid_mid"), attn_res=n("attn_out"),
                 mlp_res=n("mlp_out"), skip_pre=n("resid_pre"), skip_mid=0.0 if mid is None else n("resid_mid"))
    hub = ids["post"] if mid is None else ids["mid"]  # where attn_out and the first skip land
    edges += [
        EdgeSpec(ids["pre"], ids["attn_in"], "ln", w["ln1"], LN_COLOR),
        EdgeSpec(ids["attn_out"], hub, "residual", w["attn_res"], entropy_of=ids["attn_out"]),
        EdgeSpec(ids["pre"], hub, "skip", w["skip_pre"], SKIP_PRE),
        EdgeSpec(ids["pre"] if mid is None else ids["mid"], ids["mlp_in"], "ln", w["ln2"], LN_COLOR),
        EdgeSpec(ids["mlp_out"], ids["post"], "residual", w["mlp_res"], entropy_of=ids["mlp_out"]),
    ]
    if mid is not None:
        edges.append(EdgeSpec(ids["mid"], ids["post"], "skip", w["skip_mid"], SKIP_MID))

    # ---- attention heads and memories
    like = opts.get("like")  # reuse another graph's selection (same nodes, e.g. forward vs backward)
    heads = V.top_selection(head_score, opts["n_heads"]) if like is None else like.get(("heads", layer), heads_none)
    attn_in_norm = _norm(a["attn_in"][p])
    if bw:
        ra_max = float(ra_p.abs().max()) or 1.0
    for j in heads.tolist():
        hj = f"{L}.H{j}"
        if bw:
            q_vec = V.through_key(W_K[j:j + 1], g_q[j:j + 1])[0]
            qkv_weight, query_weight = _norm(qkv_vec[j]), _norm(W_Q[j] @ g_q[j])
            extra = []
        else:
            q_vec = qkv_vec[j]
            qkv_weight, query_weight = attn_in_norm, 0.2 * _norm(q_vec)
            # the current token's key/value: the same computation as memory (j, p), shared if kept
            extra = [("key of this token", W_Q[j] @ keys[p, j], (f"{hj}.k{p}", "same")),
                     ("value of this token", vals[p, j] @ W_O[j], (f"{hj}.v{p}", "same"))]
        same_q = None if bw else (f"{hj}.q", "same")  # forward qkv_j and q_j are the same vector
        nodes.append(NodeSpec(f"{hj}.qkv", "qkv", layer, "qkv", qkv_vec[j], float(head_score[j]), head=j,
                              position=p, extra=extra, share=same_q))
        nodes.append(NodeSpec(f"{hj}.q", "query", layer, "q", q_vec, float(head_score[j]), head=j, position=p,
                              share=same_q))
        edges.append(EdgeSpec(ids["attn_in"], f"{hj}.qkv", "qkv", qkv_weight))
        edges.append(EdgeSpec(f"{hj}.qkv", f"{hj}.q", "query", query_weight))
        mem = (V.top_selection(mem_score[j], opts["n_memory"]) if like is None
               else like.get(("memory", layer, j), heads_none))
        for i in mem.tolist():
            prob = float(att[j, i])
            src = f"created from {tokens[i]!r} (position {i})"
            if bw:
                r = float(ra_p[j, i])
                k_vec = r * (W_Q[j] @ q[j])
                v_vec = (prob * g_z[j]) @ W_O[j]
                key_w, key_c = max(10 * abs(r) / ra_max, 0.51), (POS_COLOR if -r > 0 else NEG_COLOR)
                head_w = _norm(v_vec)
                note = f"{src}; attention {prob:.3f}, RA {r:+.3g}"
                k_share, v_share = _dir(f"{hj}.WQq", r), _dir(f"{hj}.A", prob)  # r·W_Q q, P·A_j
            else:
                k_vec, v_vec = W_Q[j] @ keys[i, j], vals[i, j] @ W_O[j]
                key_w, key_c = max(10 * prob, 0.51), attention_color(prob)
                head_w = max(1.3 * prob * _norm(v_vec), 0.51)
                note = f"{src}; attention {prob:.3f}"
                k_share, v_share = (f"{hj}.k{i}", "same"), (f"{hj}.v{i}", "same")
            nodes.append(NodeSpec(f"{hj}.k{i}", "key", layer, "memory key", k_vec, float(mem_score[j, i]),
                                  head=j, position=i, note=note, share=k_share))
            nodes.append(NodeSpec(f"{hj}.v{i}", "value", layer, "memory value", v_vec, float(mem_score[j, i]),
                                  head=j, position=i, note=note, share=v_share))
            edges.append(EdgeSpec(f"{hj}.q", f"{hj}.k{i}", "attention_key", key_w, key_c))
            edges.append(EdgeSpec(f"{hj}.k{i}", f"{hj}.v{i}", "attention_value", max(10 * prob, 0.51),
                                   attention_color(prob)))
            edges.append(EdgeSpec(f"{hj}.v{i}", f"{hj}.A", "head", head_w))
        nodes.append(NodeSpec(f"{hj}.A", "head", layer, "head output", head_vec[j], float(head_score[j]), head=j,
                              share=(f"{hj}.A+", "same") if bw else None))
        edges.append(EdgeSpec(f"{hj}.A", ids["concat"], "concat",
                               _norm(head_vec[j]) if bw else 1.8 * _norm(head_vec[j])))
    nodes.append(NodeSpec(ids["concat"], "concat", layer, "concat", None,
                           _norm(g_z if bw else z)))

    # ---- W_O neurons (rows of W_O as [h·e, d]) and b_O
    rows = (V.signed_selection(wo_score, opts["n_top"], opts["n_bottom"]) if like is None
            else like.get(("wo", layer), heads_none))
    for r in rows.tolist():
        s = float(wo_score[r])
        j, e = divmod(r, ad.d_head)
        if bw:
            vec, out_w = z_flat[r] * g["attn_out"][p], abs(float(z_flat[r] * gz_flat[r]))
        else:
            vec, out_w = W_O[j, e], abs(s)
        nid = f"{L}.O{r}"
        nodes.append(NodeSpec(nid, "wo_neuron", layer, f"W_O row {r} (head {j}, dim {e})", vec, s, head=j,
                              neuron=r, negative=(s < 0) and not bw, note=f"z = {float(z_flat[r]):+.3g}",
                              share=_dir(f"{L}.g_attn_out", float(z_flat[r])) if bw else None))
        edges.append(EdgeSpec(ids["concat"], nid, "neuron_in", 7.0, POS_COLOR if s > 0 else NEG_COLOR))
        edges.append(EdgeSpec(nid, ids["attn_out"], "neuron_out", out_w))
    if opts["bias"] and bool(b_O.abs().sum() > 0):
        vec = g["attn_out"][p] if bw else b_O
        nodes.append(NodeSpec(f"{L}.b_O", "bias", layer, "b_O", vec, _norm(vec), bias=True,
                              share=(f"{L}.g_attn_out+", "same") if bw else None))
        edges.append(EdgeSpec(ids["concat"], f"{L}.b_O", "bias_in", 7.0))
        edges.append(EdgeSpec(f"{L}.b_O", ids["attn_out"], "bias_out", _norm(vec)))

    # ---- MLP key-value memories
    neurons = (V.signed_selection(mlp_score, opts["n_top"], opts["n_bottom"]) if like is None
               else like.get(("mlp", layer), heads_none))
    x_in = a["mlp_in"][p]
    for i in neurons.tolist():
        s, hi = float(mlp_score[i]), float(h_mlp[i])
        if bw:
            gi = float(g_h[i])
            k_vec, v_vec = g["mlp_pre"][p, i] * x_in, hi * g["mlp_out"][p]
            act_w, out_w = abs(hi * gi), abs(hi * gi)
            color = POS_COLOR if s > 0 else NEG_COLOR
            note = f"h = {hi:+.3g}, dL/dh = {gi:+.3g}"
        else:
            k_vec, v_vec = W_in[:, i], W_out[i]
            act_w, out_w = 1.5 * abs(hi), abs(s)
            color = POS_COLOR if hi > 0 else NEG_COLOR
            note = f"h = {hi:+.3g}"
        neg = (s < 0) and not bw
        k_share = _dir(f"{L}.x_mlp_in", float(g["mlp_pre"][p, i])) if bw else None
        v_share = _dir(f"{L}.g_mlp_out", hi) if bw else None
        nodes.append(NodeSpec(f"{L}.K{i}", "mlp_key", layer, f"MLP key {i}", k_vec, s, neuron=i, negative=neg,
                              note=note, share=k_share))
        nodes.append(NodeSpec(f"{L}.V{i}", "mlp_value", layer, f"MLP value {i}", v_vec, s, neuron=i, negative=neg,
                              note=note, share=v_share))
        edges.append(EdgeSpec(ids["mlp_in"], f"{L}.K{i}", "mlp_key_in", 7.0, entropy_of=f"{L}.K{i}"))
        edges.append(EdgeSpec(f"{L}.K{i}", f"{L}.V{i}", "mlp_act", act_w, color))
        edges.append(EdgeSpec(f"{L}.V{i}", ids["mlp_out"], "mlp_value_out", out_w, entropy_of=f"{L}.V{i}"))
    if opts["bias"]:
        biases = []
        if bool(b_in.abs().sum() > 0) and not ad.gated_mlp:
            biases.append(("b_in", (g["mlp_pre"][p] @ W_out) if bw else b_in @ W_out, "b_in @ W_out"))
        if bool(b_out.abs().sum() > 0):
            biases.append(("b_out", g["mlp_out"][p] if bw else b_out, "b_out"))
        for key, vec, name in biases:
            nid = f"{L}.mlp_{key}"
            share = (f"{L}.g_mlp_out+", "same") if bw and key == "b_out" else None
            nodes.append(NodeSpec(nid, "bias", layer, name, vec, _norm(vec), bias=True, share=share))
            edges.append(EdgeSpec(ids["mlp_in"], nid, "bias_in", 7.0))
            edges.append(EdgeSpec(nid, ids["mlp_out"], "bias_out", _norm(vec)))
    return nodes, edges
