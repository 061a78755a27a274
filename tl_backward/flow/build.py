"""Build VISIT flow graphs (forward) and their backward twins from one pass over the model.

The tensor formulas live in :mod:`tl_backward.flow.vectors`; this module gathers the tensors
(one ``run_with_cache`` under ``no_grad`` for a forward graph, one :func:`~tl_backward.core.capture.capture`
for a backward graph), prunes, projects every node vector in one batched logit-lens pass
(:mod:`tl_backward.flow.project`) and assembles a :class:`~tl_backward.flow.graph.FlowGraph`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from tl_backward.core.adapter import ModelAdapter, get_adapter

from . import vectors as V
from .graph import Edge, FlowGraph, Node, merge
from .project import project

# VISIT's node palette: 70 stops indexed by floor(rank / |V| · 70).
PALETTE = (["lime"] + ["greenyellow"] + ["yellow"] * 3 + ["dimgrey"] * 53 + ["orangered"] * 3
           + ["red"] * 4 + ["darkred"] * 5)
BIAS_COLOR = "pink"
LN_COLOR = "darkviolet"
SKIP_PRE, SKIP_MID = "rgba(102,0,204,.3)", "rgba(51,102,153,.3)"
POS_COLOR, NEG_COLOR = "blue", "red"
GATED_NOTE = ("gated MLP: the key node is W_in (the up projection) only; the gate is ignored "
              "(an approximation, as in VISIT's Llama support)")


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


# ------------------------------------------------------------------------------------- gathering
@dataclass
class _Data:
    """Tensors of one layer at position p (row 0). ``g_*`` are gradients (backward only)."""

    acts: dict[str, Tensor]
    grads: dict[str, Tensor] = field(default_factory=dict)


def _names(ad: ModelAdapter, layer: int, backward: bool) -> dict[str, str]:
    kinds = ["resid_pre", "attn_in", "q", "k", "v", "pattern", "z", "attn_out", "mlp_in", "mlp_post",
             "mlp_out", "resid_post"]
    if not ad.parallel_blocks:
        kinds.append("resid_mid")
    names = {k: ad.hook_name(k, layer) for k in kinds}
    if backward:
        names["attn_scores"] = ad.hook_name("attn_scores", layer)
        names["mlp_pre"] = ad.hook_name("mlp_pre_linear" if ad.gated_mlp else "mlp_pre", layer)
        names["ln1_in"] = f"blocks.{layer}.ln1.hook_in"  # the LN1-branch gradient of resid_pre
        names["ln2_in"] = f"blocks.{layer}.ln2.hook_in"  # the LN2-branch gradient
    return names


def _rotary(ad: ModelAdapter, n_pos: int) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """cos, sin [pos, rot] of the model's rotary embedding (None for absolute positions).

    GPT-NeoX's bridge does not fire hook_rot_q/k, and hook_cos/sin carry no gradient, so the HF
    rotary module is called directly (positions 0..n_pos-1, one unpadded prompt).
    # TODO(core): an adapter method returning cos/sin would serve every RoPE consumer.
    """
    if not ad.rotary:
        return None, None
    for mod in ad.model.original_model.modules():
        name = type(mod).__name__
        if name.endswith("RotaryEmbedding") and "Bridge" not in name:
            dtype = next(ad.model.parameters()).dtype
            x = torch.zeros(1, n_pos, ad.d_model, dtype=dtype, device=next(ad.model.parameters()).device)
            with torch.no_grad():
                cos, sin = mod(x, torch.arange(n_pos, device=x.device)[None])
            return cos[0].float().cpu(), sin[0].float().cpu()
    raise ValueError("this rotary model has no HF *RotaryEmbedding module to read cos/sin from")


def _gather(ad: ModelAdapter, tokens: Tensor, layers: list[int], p: int, backward: bool,
            metric: Any, target: int | None) -> tuple[list[_Data], int, float | None]:
    """Run the model once; return per-layer data, the target id and the metric value."""
    names = {l: _names(ad, l, backward) for l in layers}
    flat = list(dict.fromkeys(n for d in names.values() for n in d.values()))
    model = ad.model
    chosen: dict[str, int] = {}
    if backward:
        from tl_backward.core.capture import capture

        def loss(logits: Tensor, toks: Tensor) -> Tensor:
            row = logits[0, p].float()
            chosen["t"] = int(row.argmax()) if target is None else target
            if metric is not None:
                return metric(logits, toks)
            return -torch.log_softmax(row, -1)[chosen["t"]]

        cache = capture(model, tokens, loss, names=flat)
        acts = {n: t.cpu() for n, t in cache.activations.items()}
        grads, value = {n: t.cpu() for n, t in cache.gradients.items()}, float(cache.metric)
    else:
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens.to(_device(model)), names_filter=flat)
        chosen["t"] = int(logits[0, p].argmax()) if target is None else target
        acts = {n: cache[n].detach().float().cpu() for n in flat}
        grads, value = {}, None
        del cache, logits
    out = []
    for l in layers:
        nm = names[l]
        out.append(_Data(acts={k: acts[n][0] for k, n in nm.items()},
                         grads={k: grads[n][0] for k, n in nm.items()} if backward else {}))
    return out, chosen["t"], value


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------- specs
@dataclass
class _NodeSpec:
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
    extra: list[tuple[str, Tensor]] = field(default_factory=list)  # more hover projections
    note: str = ""


@dataclass
class _EdgeSpec:
    source: str
    target: str
    kind: str
    weight: float
    color: str | None = None
    entropy_of: str | None = None  # colour = entropy grey of this node's projection


def _norm(x: Tensor) -> float:
    return float(x.norm())


def _layer_specs(ad: ModelAdapter, d: _Data, layer: int, p: int, opts: dict, backward: bool,
                 tokens: list[str], rot: tuple) -> tuple[list[_NodeSpec], list[_EdgeSpec]]:
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
    pre, mid, post = a["resid_pre"][p], (None if ad.parallel_blocks else a["resid_mid"][p]), a["resid_post"][p]
    L = f"L{layer}"
    ids = dict(pre=f"resid{layer}", post=f"resid{layer + 1}", mid=f"{L}.resid_mid", attn_in=f"{L}.attn_in",
               attn_out=f"{L}.attn_out", mlp_in=f"{L}.mlp_in", mlp_out=f"{L}.mlp_out", concat=f"{L}.concat")
    nodes: list[_NodeSpec] = []
    edges: list[_EdgeSpec] = []

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

    # ---- skeleton
    def skel(key: str, name: str, kind: str, fwd: Tensor, grad: Tensor | None) -> None:
        vec = grad if bw else fwd
        nodes.append(_NodeSpec(ids[key], kind, layer, name, vec, _norm(vec)))

    skel("pre", "block_in", "resid", pre, g["resid_pre"][p] if bw else None)
    skel("attn_in", "attn_in", "attn_in", a["attn_in"][p], g["attn_in"][p] if bw else None)
    skel("attn_out", "attn_out", "attn_out", a["attn_out"][p], g["attn_out"][p] if bw else None)
    if mid is not None:
        skel("mid", "resid_mid", "resid", mid, g["attn_out"][p] if bw else None)  # full resid_mid grad
    skel("mlp_in", "mlp_in", "mlp_in", a["mlp_in"][p], g["mlp_in"][p] if bw else None)
    skel("mlp_out", "mlp_out", "mlp_out", a["mlp_out"][p], g["mlp_out"][p] if bw else None)
    skel("post", "block_out", "resid", post, g["resid_post"][p] if bw else None)

    def flow(fwd: float, back: float) -> float:
        return back if bw else fwd

    gp = (lambda k: g[k][p]) if bw else (lambda k: None)
    if mid is not None:
        edges += [
            _EdgeSpec(ids["pre"], ids["attn_in"], "ln", flow(_norm(pre), _norm(gp("ln1_in")) if bw else 0), LN_COLOR),
            _EdgeSpec(ids["attn_out"], ids["mid"], "residual",
                      flow(_norm(a["attn_out"][p]), _norm(gp("attn_out")) if bw else 0), entropy_of=ids["attn_out"]),
            _EdgeSpec(ids["pre"], ids["mid"], "skip", flow(_norm(pre), _norm(gp("attn_out")) if bw else 0), SKIP_PRE),
            _EdgeSpec(ids["mid"], ids["mlp_in"], "ln", flow(_norm(mid), _norm(gp("ln2_in")) if bw else 0), LN_COLOR),
            _EdgeSpec(ids["mlp_out"], ids["post"], "residual",
                      flow(_norm(a["mlp_out"][p]), _norm(gp("resid_post")) if bw else 0), entropy_of=ids["mlp_out"]),
            _EdgeSpec(ids["mid"], ids["post"], "skip", flow(_norm(mid), _norm(gp("resid_post")) if bw else 0), SKIP_MID),
        ]
    else:  # parallel block: attention and MLP both read block_in
        edges += [
            _EdgeSpec(ids["pre"], ids["attn_in"], "ln", flow(_norm(pre), _norm(gp("ln1_in")) if bw else 0), LN_COLOR),
            _EdgeSpec(ids["pre"], ids["mlp_in"], "ln", flow(_norm(pre), _norm(gp("ln2_in")) if bw else 0), LN_COLOR),
            _EdgeSpec(ids["attn_out"], ids["post"], "residual",
                      flow(_norm(a["attn_out"][p]), _norm(gp("resid_post")) if bw else 0), entropy_of=ids["attn_out"]),
            _EdgeSpec(ids["mlp_out"], ids["post"], "residual",
                      flow(_norm(a["mlp_out"][p]), _norm(gp("resid_post")) if bw else 0), entropy_of=ids["mlp_out"]),
            _EdgeSpec(ids["pre"], ids["post"], "skip", flow(_norm(pre), _norm(gp("resid_post")) if bw else 0), SKIP_PRE),
        ]

    # ---- attention heads and memories
    heads = V.top_selection(head_score, opts["n_heads"])
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
            extra = [("key of this token", W_Q[j] @ keys[p, j]), ("value of this token", vals[p, j] @ W_O[j])]
        nodes.append(_NodeSpec(f"{hj}.qkv", "qkv", layer, "qkv", qkv_vec[j], float(head_score[j]), head=j,
                               position=p, extra=extra))
        nodes.append(_NodeSpec(f"{hj}.q", "query", layer, "q", q_vec, float(head_score[j]), head=j, position=p))
        edges.append(_EdgeSpec(ids["attn_in"], f"{hj}.qkv", "qkv", qkv_weight))
        edges.append(_EdgeSpec(f"{hj}.qkv", f"{hj}.q", "query", query_weight))
        mem = V.top_selection(mem_score[j], opts["n_memory"])
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
            else:
                k_vec, v_vec = W_Q[j] @ keys[i, j], vals[i, j] @ W_O[j]
                key_w, key_c = max(10 * prob, 0.51), attention_color(prob)
                head_w = max(1.3 * prob * _norm(v_vec), 0.51)
                note = f"{src}; attention {prob:.3f}"
            nodes.append(_NodeSpec(f"{hj}.k{i}", "key", layer, "memory key", k_vec, float(mem_score[j, i]),
                                   head=j, position=i, note=note))
            nodes.append(_NodeSpec(f"{hj}.v{i}", "value", layer, "memory value", v_vec, float(mem_score[j, i]),
                                   head=j, position=i, note=note))
            edges.append(_EdgeSpec(f"{hj}.q", f"{hj}.k{i}", "attention_key", key_w, key_c))
            edges.append(_EdgeSpec(f"{hj}.k{i}", f"{hj}.v{i}", "attention_value", max(10 * prob, 0.51),
                                   attention_color(prob)))
            edges.append(_EdgeSpec(f"{hj}.v{i}", f"{hj}.A", "head", head_w))
        nodes.append(_NodeSpec(f"{hj}.A", "head", layer, "head output", head_vec[j], float(head_score[j]), head=j))
        edges.append(_EdgeSpec(f"{hj}.A", ids["concat"], "concat",
                               _norm(head_vec[j]) if bw else 1.8 * _norm(head_vec[j])))
    nodes.append(_NodeSpec(ids["concat"], "concat", layer, "concat", None,
                           _norm(g_z if bw else z)))

    # ---- W_O neurons (rows of W_O as [h·e, d]) and b_O
    rows = V.signed_selection(wo_score, opts["n_top"], opts["n_bottom"])
    for r in rows.tolist():
        s = float(wo_score[r])
        j, e = divmod(r, ad.d_head)
        if bw:
            vec, out_w = z_flat[r] * g["attn_out"][p], abs(float(z_flat[r] * gz_flat[r]))
        else:
            vec, out_w = W_O[j, e], abs(s)
        nid = f"{L}.O{r}"
        nodes.append(_NodeSpec(nid, "wo_neuron", layer, f"W_O row {r} (head {j}, dim {e})", vec, s, head=j,
                               neuron=r, negative=(s < 0) and not bw, note=f"z = {float(z_flat[r]):+.3g}"))
        edges.append(_EdgeSpec(ids["concat"], nid, "neuron_in", 7.0, POS_COLOR if s > 0 else NEG_COLOR))
        edges.append(_EdgeSpec(nid, ids["attn_out"], "neuron_out", out_w))
    if opts["bias"] and bool(b_O.abs().sum() > 0):
        vec = g["attn_out"][p] if bw else b_O
        nodes.append(_NodeSpec(f"{L}.b_O", "bias", layer, "b_O", vec, _norm(vec), bias=True))
        edges.append(_EdgeSpec(ids["concat"], f"{L}.b_O", "bias_in", 7.0))
        edges.append(_EdgeSpec(f"{L}.b_O", ids["attn_out"], "bias_out", _norm(vec)))

    # ---- MLP key-value memories
    neurons = V.signed_selection(mlp_score, opts["n_top"], opts["n_bottom"])
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
        nodes.append(_NodeSpec(f"{L}.K{i}", "mlp_key", layer, f"MLP key {i}", k_vec, s, neuron=i, negative=neg, note=note))
        nodes.append(_NodeSpec(f"{L}.V{i}", "mlp_value", layer, f"MLP value {i}", v_vec, s, neuron=i, negative=neg,
                               note=note))
        edges.append(_EdgeSpec(ids["mlp_in"], f"{L}.K{i}", "mlp_key_in", 7.0, entropy_of=f"{L}.K{i}"))
        edges.append(_EdgeSpec(f"{L}.K{i}", f"{L}.V{i}", "mlp_act", act_w, color))
        edges.append(_EdgeSpec(f"{L}.V{i}", ids["mlp_out"], "mlp_value_out", out_w, entropy_of=f"{L}.V{i}"))
    if opts["bias"]:
        biases = []
        if bool(b_in.abs().sum() > 0) and not ad.gated_mlp:
            biases.append(("b_in", (g["mlp_pre"][p] @ W_out) if bw else b_in @ W_out, "b_in @ W_out"))
        if bool(b_out.abs().sum() > 0):
            biases.append(("b_out", g["mlp_out"][p] if bw else b_out, "b_out"))
        for key, vec, name in biases:
            nid = f"{L}.mlp_{key}"
            nodes.append(_NodeSpec(nid, "bias", layer, name, vec, _norm(vec), bias=True))
            edges.append(_EdgeSpec(ids["mlp_in"], nid, "bias_in", 7.0))
            edges.append(_EdgeSpec(nid, ids["mlp_out"], "bias_out", _norm(vec)))
    return nodes, edges


# ------------------------------------------------------------------------------------- assembly
def _fmt_list(pairs: Sequence[tuple[str, float]]) -> str:
    return "[" + ", ".join(repr(t) for t, _ in pairs) + "]"


def _assemble(ad: ModelAdapter, specs: list[_NodeSpec], espec: list[_EdgeSpec], target: int, target_str: str,
              backward: bool, normalize: bool, k: int) -> tuple[list[Node], list[Edge]]:
    """Project every node vector in one batch and turn specs into Nodes/Edges."""
    proj_specs = [s for s in specs if s.vector is not None]
    extra = [(s, cap, v) for s in proj_specs for cap, v in s.extra]
    rows = torch.stack([s.vector.float() for s in proj_specs] + [v.float() for _, _, v in extra])
    pr = project(ad, rows, target, k=k, normalize=normalize)
    ids = torch.cat([pr.top_ids.reshape(-1), pr.bottom_ids.reshape(-1)]).unique().tolist()
    decoded = dict(zip(ids, _decode(ad, ids)))
    n_vocab = ad.d_vocab

    def pairs(idx: Tensor, probs: Tensor) -> tuple[tuple[str, float], ...]:
        return tuple((decoded[int(i)], float(pv)) for i, pv in zip(idx, probs))

    row_of = {id(s): i for i, s in enumerate(proj_specs)}
    extra_lines: dict[int, list[str]] = {}
    for n, (s, cap, _) in enumerate(extra):
        r = len(proj_specs) + n
        extra_lines.setdefault(id(s), []).append(f"{cap}: {_fmt_list(pairs(pr.top_ids[r], pr.top_probs[r]))}")

    nodes: list[Node] = []
    entropy: dict[str, float] = {}
    for s in specs:
        head = f"{s.layer}) {s.name}"
        if s.head is not None and s.kind not in ("wo_neuron",):
            head += f" [head {s.head}]"
        if id(s) not in row_of:
            title = f"{head}: not projected (raw concatenated {'∂L/∂z' if backward else 'z'}), norm {s.value:.3g}"
            nodes.append(Node(s.id, s.kind, s.layer, "concat", s.value, s.value, name=s.name, color="white",
                              title=title))
            continue
        r = row_of[id(s)]
        top, bottom = pairs(pr.top_ids[r], pr.top_probs[r]), pairs(pr.bottom_ids[r], pr.bottom_probs[r])
        rank, brank = int(pr.rank[r]) + 1, int(pr.bottom_rank[r]) + 1
        tprob, ent = float(pr.target_prob[r]), float(pr.entropy[r])
        entropy[s.id] = ent
        from_bottom = backward or s.negative
        label = bottom[0][0] if from_bottom else top[0][0]
        color = BIAS_COLOR if s.bias else rank_color((brank if from_bottom else rank) - 1, n_vocab)
        norm = _norm(s.vector)
        if backward:
            lines = [f"{head} (gradient): bottom-{k} {_fmt_list(bottom)}", f"top-{k} {_fmt_list(top)}",
                     f"target {target_str!r}: rank {brank} from the bottom of {n_vocab} (p={tprob:.3g})",
                     f"norm {norm:.3g}, score {s.value:+.3g}, entropy {ent:.2f} bits"]
        else:
            shown = bottom if s.negative else top
            lines = [f"{head}: {'bottom' if s.negative else 'top'}-{k} {_fmt_list(shown)}",
                     f"target {target_str!r}: p={tprob:.3g}, rank {rank} of {n_vocab}",
                     f"norm {norm:.3g}, score {s.value:+.3g}, entropy {ent:.2f} bits"]
        lines += extra_lines.get(id(s), [])
        if s.note:
            lines.append(s.note)
        nodes.append(Node(s.id, s.kind, s.layer, label, s.value, norm, name=s.name, head=s.head, neuron=s.neuron,
                          position=s.position, top=top, bottom=bottom, target_prob=tprob, target_rank=rank,
                          target_bottom_rank=brank, entropy=ent, color=color, title="\n".join(lines),
                          vector=s.vector.detach().clone()))
    edges = []
    for e in espec:
        color = e.color
        if e.entropy_of is not None:
            color = entropy_grey(entropy[e.entropy_of]) if e.entropy_of in entropy else None
        edges.append(Edge(e.source, e.target, e.kind, float(e.weight), color or "#9aa7b4"))
    return nodes, edges


def _decode(ad: ModelAdapter, ids: list[int]) -> list[str]:
    tok = getattr(ad.model, "tokenizer", None)
    if tok is None:
        return [str(i) for i in ids]
    return list(tok.batch_decode([[i] for i in ids]))


# ------------------------------------------------------------------------------------- public API
def _check_count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (-1 keeps all), got {type(value).__name__}")
    if value < -1:
        raise ValueError(f"{name} must be >= -1 (-1 keeps all), got {value}")
    return value


def flow_graph(model: Any, input: Any, *, layer: int | Sequence[int], target: Any = None, position: int = -1,
               n_heads: int = 10, n_memory: int = 2, n_top_neurons: int = 18, n_bottom_neurons: int = 7,
               backward: bool = False, metric: Any = None, bias_nodes: bool = True,
               normalize: bool | None = None, k: int = 5, prepend_bos: bool | None = None) -> FlowGraph:
    """VISIT's information-flow graph of ``layer`` (an int, or several layers chained) at token
    ``position`` of one prompt, forward or (``backward=True``) backward.

    **Forward** (Katz & Belinkov 2023, VISIT). Skeleton nodes block_in (resid_pre), attn_in (LN1
    output, post-affine), attn_out, resid_mid, mlp_in (LN2 output), mlp_out, block_out (resid_post);
    per kept head j: qkv_j / q_j = W_K[j]q_j, memory key i = W_Q[j]k'_{j,i} and value i =
    v_{j,i}W_O[j] (k, v from kv head j // group under GQA; k' is the key as the query at p sees it,
    R_p⁻¹R_i k_i under RoPE), head output A_j = z_jW_O[j], an unprojected ``concat`` node, W_O
    neurons (rows of W_O as [h·d_head, d_model]) and b_O; MLP key/value neurons W_in[:, i] /
    W_out[i] and the bias nodes b_in@W_out, b_out. Edge weights: LN steps and skips ‖input‖,
    attn_out→resid_mid ‖attn_out‖, mlp_out→block_out ‖mlp_out‖, attn_in→qkv ‖attn_in‖,
    qkv→q 0.2‖W_K q‖, q→k and k→v max(10a, .51) with a = attention of p to i, v→A max(1.3a‖vW_O‖, .51),
    A→concat 1.8‖zW_O‖, concat→neuron 7, neuron r→attn_out |z_r‖W_O[r]‖|, mlp_in→key 7,
    key→value 1.5|h_i|, value→mlp_out |h_i‖W_out[i]‖|, bias in 7 / out ‖bias vector‖.
    Pruning: the ``n_heads`` heads with the largest ‖z_jW_O[j]‖ (VISIT's reference ranks by ‖z_j‖),
    the ``n_memory`` key positions with the largest attention, the ``n_top_neurons`` largest and
    ``n_bottom_neurons`` smallest **signed** scores z_r‖W_O[r]‖ and h_i‖W_out[i]‖ (−1 keeps all).

    **Backward** (tl_backward's extension). One :func:`~tl_backward.core.capture.capture` of the
    loss L (default: −log p(target) at ``position``; or ``metric(logits, tokens)``). Same topology;
    every activation node carries g = ∂L/∂activation at p — block_in/out grad(resid_pre/post),
    attn_out and resid_mid grad(hook_attn_out) (the full residual gradient), attn_in/mlp_in
    grad(ln1.hook_out)/grad(mlp.hook_in), mlp_out grad(mlp_out) — and the others:
    q_j = W_K[j]g_q, memory key = W_Q[j](RA_j[p,i]·q_{p,j}), memory value = (P_j[p,i]·g_z)W_O[j],
    A_j = g_zW_O[j], qkv_j = W_Q[j]g_q + W_K[j]g_k⁽ʲ⁾ + W_V[j]g_v⁽ʲ⁾ (what attn_in[p] receives through
    head j; these sum to grad attn_in[p]), W_O row r = z_p[r]·g_attn_out[p], MLP key i =
    δ_pre[p,i]·mlp_in[p] (δ at hook_pre_linear when gated), value i = h_p[i]·g_mlp_out[p] (the
    Backward Lens weight gradients restricted to p), b_O → g_attn_out, b_out → g_mlp_out,
    b_in@W_out → δ_pre@W_out. RA = ∂L/∂scores / attn_scale. Edge weights = gradient flow: LN steps
    ‖grad(ln1.hook_in)‖ / ‖grad(ln2.hook_in)‖ (the LN-branch gradients), skips and residual edges
    ‖g‖ of the node they feed, attn_in→qkv_j ‖qkv_j‖, qkv→q ‖W_Q[j]g_q‖, q→k max(10|RA|/max|RA|, .51)
    (blue when −RA > 0: attending more would lower L), k→v max(10a, .51), v→A ‖value node‖,
    A→concat ‖g_zW_O[j]‖, neuron and MLP key→value/value→out edges |act·∂L/∂act| (blue when
    −act·grad > 0, i.e. the neuron lowers L), fixed-weight edges stay 7. Pruning: heads by
    ‖g_zW_O[j]‖, memories by |RA_j[p,i]|, neurons by the signed −act·grad (top and bottom).
    Labels are the **bottom** token of LL(vector) (a descent step adds −g) and colours use the
    target's rank from the bottom, so green = the update pushes toward the target.

    **Projection** LL(v) = softmax(ln_final(v)·W_U + b_U) with the real final norm (gain and
    bias). ``normalize`` (default: True for backward graphs, False for forward) L2-normalises v
    first, because tiny gradient vectors otherwise fall under the norm's eps and all project
    like the zero vector (Backward Lens appendix). Colour: VISIT's 70-stop palette indexed by
    floor((rank−1)/|V|·70) of the target (from the bottom for negative-score forward neurons);
    bias nodes pink, concat white. Edge grey = entropy of the source/neuron projection (bits/30).

    Args:
        model: a reconstructing TransformerBridge in raw mode (compatibility mode is refused:
            fold_ln erases the LN effect and centring changes the norms VISIT draws).
        input: one prompt (str, or token ids [pos] / [1, pos]).
        layer: a layer index, or a list of layers (chained: block_out of L is block_in of L+1).
        target: token whose probability/rank colours the nodes (a string uses its first
            sub-token; mind the leading space) — default the model's argmax at ``position``.
        position: the token position (default the last).
        metric: backward only — a callable (logits, tokens) -> scalar to differentiate instead of
            the target NLL.
        bias_nodes: draw the (non-zero) bias nodes.
        k: number of tokens in the hover lists.

    Returns: a :class:`FlowGraph` (``nodes``, ``edges``, ``to_json()``, ``to_networkx()``,
    ``render()``, ``save(path)``; displays itself in Jupyter/Colab).
    """
    ad = get_adapter(model)
    if getattr(model, "compatibility_mode", False):
        raise ValueError("flow_graph needs raw weights: VISIT is not meaningful in compatibility mode "
                         "(fold_ln erases the layer-norm effect, centring changes the edge norms); "
                         "load the model without enable_compatibility_mode()")
    if not isinstance(backward, bool):
        raise TypeError(f"backward must be True or False, got {type(backward).__name__}")
    if metric is not None and not backward:
        raise ValueError("metric= only applies to backward graphs (backward=True)")
    if metric is not None and not callable(metric):
        raise TypeError("metric must be a callable (logits, tokens) -> scalar")
    layers = sorted(set(ad.layers(layer)))
    opts = dict(n_heads=_check_count(n_heads, "n_heads"), n_memory=_check_count(n_memory, "n_memory"),
                n_top=_check_count(n_top_neurons, "n_top_neurons"),
                n_bottom=_check_count(n_bottom_neurons, "n_bottom_neurons"), bias=bool(bias_nodes))
    if opts["n_bottom"] < 0:
        raise ValueError("n_bottom_neurons must be >= 0 (use n_top_neurons=-1 to keep all neurons)")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    batch = ad.tokenize(input, prepend_bos)
    if batch.tokens.shape[0] != 1:
        raise ValueError(f"flow_graph draws one prompt; got a batch of {batch.tokens.shape[0]}: pass one string")
    tokens = batch.tokens
    n_pos = tokens.shape[1]
    if not isinstance(position, int) or isinstance(position, bool):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    if not -n_pos <= position < n_pos:
        raise ValueError(f"position {position} is out of range for a prompt of {n_pos} tokens")
    p = position % n_pos
    t = None if target is None else int(ad.target_tokens(target)[0])
    data, t, value = _gather(ad, tokens, layers, p, backward, metric, t)
    str_tokens = ad.to_str_tokens(tokens)[0]
    rot = _rotary(ad, n_pos)
    target_str = _decode(ad, [t])[0]
    graphs = []
    for l, d in zip(layers, data):
        specs, espec = _layer_specs(ad, d, l, p, opts, backward, str_tokens, rot)
        nodes, edges = _assemble(ad, specs, espec, t, target_str, backward,
                                 backward if normalize is None else bool(normalize), k)
        notes = (GATED_NOTE,) if ad.gated_mlp else ()
        graphs.append(FlowGraph(nodes=tuple(nodes), edges=tuple(edges), layers=(l,), position=p,
                                tokens=tuple(str_tokens), target=t, target_token=target_str, backward=backward,
                                d_vocab=ad.d_vocab, parallel=ad.parallel_blocks, metric=value, notes=notes))
    return graphs[0] if len(graphs) == 1 else merge(graphs)
