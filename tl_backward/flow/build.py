"""Build VISIT flow graphs (forward) and their backward twins from one pass over the model.

This module gathers the tensors (one ``run_with_cache`` under ``no_grad`` for a forward graph, one
:func:`~tl_backward.core.capture.capture` for a backward graph), has :mod:`tl_backward.flow.topology`
lay out and prune each layer with the direction's rule table (:mod:`tl_backward.flow.rules`; tensor
formulas in :mod:`tl_backward.flow.vectors`), projects every node vector in one batched logit-lens
pass (:mod:`tl_backward.flow.project`) and assembles a :class:`~tl_backward.flow.graph.FlowGraph`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import ModelAdapter, get_adapter
from tl_backward.core.attention_kinds import ScoreRoute, Unsupported, hidden_rotary
from tl_backward.core.capture import capture, require_hooks
from tl_backward.errors import TLBackwardError

from .colors import BIAS_COLOR, entropy_grey, rank_color
from .graph import Edge, FlowGraph, Node, merge
from .project import project
from .specs import EdgeSpec, LayerData, NodeSpec, norm_of
from .topology import layer_specs

GATED_NOTE = ("gated MLP: the key node is W_in (the up projection) only; the gate is ignored "
              "(an approximation, as in VISIT's Llama support)")


# ------------------------------------------------------------------------------------- gathering
def _names(ad: ModelAdapter, layer: int, backward: bool) -> dict[str, str]:
    kinds = ["resid_pre", "attn_in", "q", "k", "v", "pattern", "z", "attn_out", "mlp_in", "mlp_post",
             "mlp_out", "resid_post"]
    if not ad.parallel_blocks:
        kinds.append("resid_mid")
    names = {k: ad.hook_name(k, layer) for k in kinds}
    if backward:  # what the layer's route reads RA from (core/attention_kinds.py)
        route = ad.ra_route(layer, "flow_graph")
        names.update({k: ad.hook_name(k, layer) for k in (*route.activations, *route.gradients)})
        names["mlp_pre"] = ad.hook_name("mlp_pre_linear" if ad.gated_mlp else "mlp_pre", layer)
        # the LN1- / LN2-branch gradients of the residual (a HookedTransformer's are derived points: core/hooked.py)
        names["ln1_in"], names["ln2_in"] = ad.hook_name("ln1_in", layer), ad.hook_name("ln2_in", layer)
        if names["ln2_in"] not in ad.model.hook_dict and names["ln2_in"] not in ad.derived_grads:
            raise TLBackwardError(
                "backward flow graphs split the residual gradient into the LN1 and LN2 branches, but this "
                "model's blocks have no ln2 (Phi / Falcon / Cohere-style parallel blocks share one input norm; "
                "OLMo-2's post-norm blocks have no input norms); draw the forward graph (backward=False)",
                argument="backward")
    return names


def _rotary(ad: ModelAdapter, n_pos: int, layer: int = 0) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """cos, sin [pos, rot] of ``layer``'s rotary embedding (:meth:`ModelAdapter.rotary_tables`; None for
    absolute positions): positions 0..n_pos-1 of one unpadded prompt."""
    return ad.rotary_tables(layer, n_pos) if ad.rotary else (None, None)


def _check_attention(ad: ModelAdapter, layers: list[int]) -> None:
    """Refuse where a layer's attention cannot be drawn exactly: no exact RA route (unknown bridges),
    Gemma-2 soft-capping, or q/k rotated after hook_q/hook_k with no hooked rotation (GPT-J): the key
    and query nodes need q_p·k'_i = s·score[p, i] from hook_q/hook_k (and the RoPE tables)."""
    ad.require_pre_norm_blocks("flow_graph")
    for layer in layers:
        route = ad.forward_route(layer, "flow_graph")
        if isinstance(route, ScoreRoute) and route.softcap:
            Unsupported(f"attention soft-capping (c = {route.softcap:g}) sits between q·kᵀ and "
                        "hook_attn_scores").refuse("flow_graph")
        why = hidden_rotary(ad.model.blocks[layer].attn)
        if why is not None:
            Unsupported(f"its key and query nodes need q·kᵀ from hook_q/hook_k, but {why}").refuse("flow_graph")


def flow_hook_names(model: Any, layer: int | Sequence[int], *, backward: bool = False) -> list[str]:
    """The hook points a flow graph of ``layer`` reads, for ``capture(names=...)`` when the graph is
    built from a shared cache (``flow_graph(..., cache=...)``); ``backward=True`` adds the ones only
    the backward graph needs. A backward list serves the forward graph too."""
    ad = get_adapter(model)
    layers = sorted(set(ad.layers(layer)))
    ad.require_dense_mlp(layers, "flow_graph")
    names = {l: _names(ad, l, backward) for l in layers}
    return list(dict.fromkeys(n for d in names.values() for n in d.values()))


def _gather(ad: ModelAdapter, tokens: Tensor, layers: list[int], p: int, backward: bool,
            metric: Any, target: int | None, cache: Any = None) -> tuple[list[LayerData], int, float | None]:
    """Run the model once (or read ``cache``); return per-layer data, the target id and the metric value."""
    names = {l: _names(ad, l, backward) for l in layers}
    flat = list(dict.fromkeys(n for d in names.values() for n in d.values()))
    if cache is not None:
        acts, grads, t, value = _from_cache(cache, tokens, flat, p, backward, target, ad.values_only_hooks)
    elif backward:
        acts, grads, t, value = _backward_pass(ad.model, tokens, flat, p, metric, target)
    else:
        acts, grads, t, value = _forward_pass(ad, tokens, flat, p, target)
    # hook_pattern on HF-delegating bridges: values only (RA is read through z = P·V there)
    silent = [n for n in flat if n not in acts or (backward and n not in grads and n not in ad.values_only_hooks)]
    if silent:
        raise TLBackwardError(
            f"flow graphs read {silent[:3]}, which this model's bridge never fires (e.g. OLMo-2's post-norm "
            "blocks have no input norm ln1): VISIT's pre-norm block picture does not apply", argument="model")
    out = []
    for l in layers:
        nm = names[l]
        out.append(LayerData(acts={k: acts[n][0] for k, n in nm.items()},
                             grads={k: grads[n][0] for k, n in nm.items() if n in grads} if backward else {}))
    return out, t, value


def _backward_pass(model: Any, tokens: Tensor, flat: list[str], p: int, metric: Any, target: int | None):
    chosen: dict[str, int] = {}

    def loss(logits: Tensor, toks: Tensor) -> Tensor:
        row = logits[0, p].float()
        chosen["t"] = int(row.argmax()) if target is None else target
        if metric is not None:
            return metric(logits, toks)
        return -torch.log_softmax(row, -1)[chosen["t"]]

    cache = capture(model, tokens, loss, names=flat)
    acts = {n: t.cpu() for n, t in cache.activations.items()}
    grads = {n: t.cpu() for n, t in cache.gradients.items()}
    return acts, grads, chosen["t"], float(cache.metric)


def _forward_pass(ad: ModelAdapter, tokens: Tensor, flat: list[str], p: int, target: int | None):
    """One forward pass (``ad.forward_values``: derived points from their source hooks; a hook that
    never fires is reported by _gather, not as a KeyError)."""
    logits, acts = ad.forward_values(tokens, flat)
    t = int(logits[0, p].argmax()) if target is None else target
    return {n: a.cpu() for n, a in acts.items()}, {}, t, None


def _from_cache(cache: Any, tokens: Tensor, flat: list[str], p: int, backward: bool, target: int | None,
                values_only: frozenset[str]):
    """A shared :func:`~tl_backward.capture` cache of this very prompt stands in for the pass."""
    if not hasattr(cache, "activations") or not hasattr(cache, "last_logits"):
        raise TLBackwardError(f"cache must be a GradientCache from tl_backward.capture, got {type(cache).__name__}",
                              argument="cache")
    if tuple(cache.tokens.shape) != tuple(tokens.shape) or not torch.equal(cache.tokens.cpu(), tokens.cpu()):
        raise TLBackwardError("cache was captured on other tokens than this prompt: capture the same input "
                              "(with the same prepend_bos)", argument="cache")
    require_hooks(cache, flat, "flow_hook_names(model, layer, backward=True)")
    if target is None:
        if p != tokens.shape[1] - 1:
            raise TLBackwardError("with cache= at a position other than the last, pass target= (the cache "
                                  "keeps the model's logits at the last position only)", argument="target")
        target = int(cache.last_logits[0].argmax())
    acts = {n: cache[n].detach().float().cpu() for n in flat}
    grads = {n: cache.grad(n).float().cpu() for n in flat if n not in values_only} if backward else {}
    return acts, grads, target, (float(cache.metric) if backward else None)


# ------------------------------------------------------------------------------------- assembly
def _fmt_list(pairs: Sequence[tuple[str, float]]) -> str:
    return "[" + ", ".join(repr(t) for t, _ in pairs) + "]"


def _assemble(ad: ModelAdapter, specs: list[NodeSpec], espec: list[EdgeSpec], target: int, target_str: str,
              backward: bool, normalize: bool, k: int) -> tuple[list[Node], list[Edge]]:
    """Project every node vector in one batch and turn specs into Nodes/Edges."""
    proj_specs = [s for s in specs if s.vector is not None]
    extra = [(s, cap, v, share) for s in proj_specs for cap, v, share in s.extra]
    # One row per distinct vector: members of a share group reuse its first member's projection
    # ("same": identical vectors; "dir": positive multiples, identical under the normalised lens).
    keys: dict[Any, int] = {}
    vecs: list[Tensor] = []

    def row(vec: Tensor, share: tuple | None, own: Any) -> int:
        key = share[0] if share is not None and (share[1] == "same" or normalize) else own
        if key not in keys:
            keys[key] = len(vecs)
            vecs.append(vec.float())
        return keys[key]

    spec_row = [row(s.vector, s.share, ("node", i)) for i, s in enumerate(proj_specs)]
    extra_row = [row(v, share, ("extra", n)) for n, (_, _, v, share) in enumerate(extra)]
    pr = project(ad, torch.stack(vecs), target, k=k, normalize=normalize)
    ids = torch.cat([pr.top_ids.reshape(-1), pr.bottom_ids.reshape(-1)]).unique().tolist()
    decoded = dict(zip(ids, ad.decode_ids(ids)))
    n_vocab = ad.d_vocab

    def pairs(idx: Tensor, probs: Tensor) -> tuple[tuple[str, float], ...]:
        return tuple((decoded[int(i)], float(pv)) for i, pv in zip(idx, probs))

    row_of = {id(s): r for s, r in zip(proj_specs, spec_row)}
    extra_lines: dict[int, list[str]] = {}
    for (s, cap, _, _), r in zip(extra, extra_row):
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
        norm = norm_of(s.vector)
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


# ------------------------------------------------------------------------------------- public API
def _selection(graph: FlowGraph) -> dict[tuple, Tensor]:
    """The pruning choices of ``graph``: kept heads, memory positions per head, W_O rows, MLP neurons."""
    as_t = lambda xs: torch.tensor(list(xs), dtype=torch.long)  # noqa: E731
    sel: dict[tuple, list[int]] = {}
    for n in graph.nodes:
        if n.kind == "head":
            sel.setdefault(("heads", n.layer), []).append(n.head)
        elif n.kind == "key":
            sel.setdefault(("memory", n.layer, n.head), []).append(n.position)
        elif n.kind == "wo_neuron":
            sel.setdefault(("wo", n.layer), []).append(n.neuron)
        elif n.kind == "mlp_key":
            sel.setdefault(("mlp", n.layer), []).append(n.neuron)
    return {key: as_t(v) for key, v in sel.items()}


def _check_count(value: Any, name: str) -> int:
    return checks.count(value, name, minimum=-1, hint="-1 keeps all")


def _check_like(like: Any, layers: list[int], tokens: list[str], p: int) -> dict[tuple, Tensor]:
    """The selection of ``like``, which must be a graph of the same prompt and position."""
    if not isinstance(like, FlowGraph):
        raise TLBackwardError(f"like must be a FlowGraph, got {type(like).__name__}", argument="like")
    if not set(layers) <= set(like.layers):
        raise TLBackwardError(f"like= covers layers {list(like.layers)}, not all of {layers}", argument="like")
    if tuple(like.tokens) != tuple(tokens):
        raise TLBackwardError(f"like= is a graph of another prompt ({len(like.tokens)} tokens "
                              f"{list(like.tokens)[:6]!r:.80}...): its heads and positions would mean nothing here; "
                              "pass a graph of the same prompt", argument="like")
    if like.position != p:
        raise TLBackwardError(f"like= is a graph of position {like.position}, this one is of position {p}: pass "
                              "a graph of the same position", argument="like")
    return _selection(like)


def flow_graph(model: Any, input: Any, *, layer: int | Sequence[int], target: Any = None, position: int = -1,
               n_heads: int = 10, n_memory: int = 2, n_top_neurons: int = 18, n_bottom_neurons: int = 7,
               backward: bool = False, metric: Any = None, bias_nodes: bool = True,
               normalize: bool | None = None, k: int = 5, prepend_bos: bool | None = None,
               like: FlowGraph | None = None, cache: Any = None) -> FlowGraph:
    """VISIT's information-flow graph (Katz & Belinkov 2023) of ``layer`` at token ``position`` of
    one prompt, forward or (``backward=True``) backward.

    Each node carries a d_model vector v (``Node.vector``, ``Float[Tensor, "d_model"]``) labelled by
    its logit lens LL(v) = softmax(ln_final(v)·W_U + b_U) (v L2-normalised first when ``normalize``).
    Forward, v is an activation at p or a weight row (W_O[r], W_in[:, i], W_out[i]) and an edge's
    weight is VISIT's width, e.g. ‖input‖ or max(10·a, 0.51) for attention a. Backward, v is
    g = ∂L/∂activation at p or a Backward Lens weight-gradient factor restricted to p (W_O row r:
    z_p[r]·g_attn_out[p]), L = −log p(target) at ``position`` (or ``metric(logits, tokens)``), and
    an edge's weight is the gradient flowing along it. Every node, edge weight, pruning rule and
    colour: docs/flow_graphs.md; the code: :mod:`tl_backward.flow.topology` (which nodes and edges)
    and :mod:`tl_backward.flow.rules` (their vectors and weights in each direction).

    Args:
        model: a reconstructing TransformerBridge in raw mode (compatibility mode is refused:
            fold_ln erases the LN effect and centring changes the norms VISIT draws), or a
            HookedTransformer with pre-norm blocks and dense MLPs (its ln1/ln2 points are derived:
            core/hooked.py; loaded with fold_ln it draws the processed weights it holds).
        input: one prompt (str, or token ids [pos] / [1, pos]).
        layer: a layer index, or a list of layers (chained: block_out of L is block_in of L+1).
        target: token whose probability/rank colours the nodes (a string uses its first
            sub-token; mind the leading space) — default the model's argmax at ``position``.
        position: the token position (default the last).
        n_heads, n_memory, n_top_neurons, n_bottom_neurons: how many heads, memories per head and
            top/bottom neurons to keep (−1 keeps all).
        backward: build the backward graph.
        metric: backward only — a callable (logits, tokens) -> scalar to differentiate instead of
            the target NLL.
        bias_nodes: draw the (non-zero) bias nodes.
        normalize: L2-normalise vectors before the lens (default: True backward, False forward).
        k: number of tokens in the hover lists.
        prepend_bos: for a string prompt, whether to prepend BOS (default: the model's setting).
        like: keep exactly the heads, memories and neurons of another graph of the same layers
            (e.g. the forward graph, so a backward graph has identical nodes and layout); the
            n_* pruning arguments are then ignored.
        cache: a :func:`~tl_backward.capture` cache of this same prompt holding
            :func:`flow_hook_names` (``backward=True`` for a backward graph): the graph is read off
            it instead of running the model, so several analyses share one pass; a backward graph
            then explains the cache's metric.

    Returns: a :class:`FlowGraph` (``nodes``, ``edges``, ``to_json()``, ``to_networkx()``,
    ``render()``, ``save(path)``; displays itself in Jupyter/Colab).
    """
    ad = get_adapter(model)
    if getattr(model, "compatibility_mode", False):
        raise TLBackwardError("flow_graph needs raw weights: VISIT is not meaningful in compatibility mode "
                              "(fold_ln erases the layer-norm effect, centring changes the edge norms); "
                              "load the model without enable_compatibility_mode()", argument="model")
    layers = sorted(ad.layers(layer, "layer"))
    ad.require_dense_mlp(layers, "flow_graph")  # VISIT's MLP nodes are one dense MLP's neurons
    _check_attention(ad, layers)
    checks.flag(backward, "backward")
    if metric is not None and not backward:
        raise TLBackwardError("metric= only applies to backward graphs (backward=True)", argument="metric")
    if metric is not None and not callable(metric):
        raise TLBackwardError("metric must be a callable (logits, tokens) -> scalar", argument="metric")
    opts = dict(n_heads=_check_count(n_heads, "n_heads"), n_memory=_check_count(n_memory, "n_memory"),
                n_top=_check_count(n_top_neurons, "n_top_neurons"),
                n_bottom=checks.count(n_bottom_neurons, "n_bottom_neurons",
                                      hint="use n_top_neurons=-1 to keep all neurons"),
                bias=checks.flag(bias_nodes, "bias_nodes"))
    checks.count(k, "k", minimum=1, maximum=ad.d_vocab, hint="tokens in the hover lists")
    checks.flag(normalize, "normalize", none_ok=True)
    batch = ad.tokenize(input, prepend_bos)
    if batch.tokens.shape[0] != 1:
        raise TLBackwardError(f"flow_graph draws one prompt, but input is a batch of {batch.tokens.shape[0]}: "
                              "pass one string", argument="input")
    tokens = batch.tokens
    n_pos = tokens.shape[1]
    p = checks.index(position, n_pos, "position", "position", "the prompt")
    str_tokens = ad.to_str_tokens(tokens)[0]
    if like is not None:
        opts["like"] = _check_like(like, layers, str_tokens, p)
    t = None if target is None else int(ad.target_tokens(target)[0])
    if cache is not None and metric is not None:
        raise TLBackwardError("pass metric= or cache= (whose metric the backward graph then explains), not both",
                              argument="metric")
    data, t, value = _gather(ad, tokens, layers, p, backward, metric, t, cache)
    str_tokens = ad.to_str_tokens(tokens)[0]
    target_str = ad.decode_ids([t])[0]
    graphs = []
    for l, d in zip(layers, data):
        specs, espec = layer_specs(ad, d, l, p, opts, backward, str_tokens, _rotary(ad, n_pos, l))
        nodes, edges = _assemble(ad, specs, espec, t, target_str, backward,
                                 backward if normalize is None else bool(normalize), k)
        notes = (GATED_NOTE,) if ad.gated_mlp else ()
        graphs.append(FlowGraph(nodes=tuple(nodes), edges=tuple(edges), layers=(l,), position=p,
                                tokens=tuple(str_tokens), target=t, target_token=target_str, backward=backward,
                                d_vocab=ad.d_vocab, parallel=ad.parallel_blocks, metric=value, notes=notes))
    return graphs[0] if len(graphs) == 1 else merge(graphs)
