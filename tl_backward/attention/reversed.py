"""Reversed Attention (Katz & Wolf, NAACL 2025): the attention map the backward pass computes.

For layer l and head h, with raw logits ``A = Q Kᵀ`` (after RoPE), scores ``S = A / s + M``
(mask M), pattern ``P = softmax_row(S)`` and pattern gradient ``dP = ∂L/∂P``::

    RA = ∂L/∂A = (∂L/∂S) / s = P ⊙ (dP − r 1ᵀ) / s,     r_i = Σ_j P_ij dP_ij

Every row sums to 0; RA is 0 wherever P is 0 (causal future, padding, custom masks); ``RA_ij > 0``
means raising logit i→j raises the loss (for an NLL: hurts the target), negative entries are
helpful edges. ∂L/∂Q = RA·K and ∂L/∂K = RAᵀ·Q, so RA plays P's role in the backward pass.

:func:`reversed_attention_from` is the pure tensor formula; :func:`reversed_attention` reads the
gradient at every requested layer's ``hook_attn_scores`` from **one** forward + backward and
divides by the layer's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.capture import require_hooks
from tl_backward.core.device import on, result_device
from tl_backward.core.metrics import resolve_metric
from tl_backward.core.stream import stream
from tl_backward.errors import TLBackwardError

from .reduced import LayerReductions, RAContext, RANorms, RATopK, check_keep, check_one_length, cropped, top_of
from .render import reversed_attention_page

__all__ = ["ReversedAttention", "frobenius", "ra_hook_names", "reversed_attention", "reversed_attention_from",
           "reversed_attention_from_cache"]


def reversed_attention_from(
    pattern: Float[Tensor, "... query_pos key_pos"],
    grad: Float[Tensor, "... query_pos key_pos"],
    scale: float | Tensor,
    *,
    grad_of: str = "pattern",
    keep: Bool[Tensor, "... query_pos key_pos"] | None = None,
) -> Float[Tensor, "... query_pos key_pos"]:
    """RA from a pattern and a gradient (pure math, no model).

    ``grad_of="pattern"``: ``grad`` is ``dP = ∂L/∂P`` and RA = ``P ⊙ (dP − rowsum(P ⊙ dP)) / scale``
    (the rowsum is ``(P*dP).sum(-1)``, O(T²), never ``diag(P @ dPᵀ)``).
    ``grad_of="scores"``: ``grad`` is ``∂L/∂S`` at the (masked) scores and RA = ``grad / scale``.

    ``scale``: s with ``S = Q Kᵀ / s`` -- a float, or a tensor broadcastable to the leading dims
    (e.g. ``[layer, 1, 1, 1, 1]``). The result is set to exactly 0 wherever ``P == 0`` -- the
    pattern gradient is *not* zero at masked entries, so this mask is explicit -- and wherever
    ``keep`` (optional, broadcastable bool) is False.
    """
    checks.one_of(grad_of, "grad_of", ("pattern", "scores"))
    for name, value in (("pattern", pattern), ("grad", grad)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            shown = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TLBackwardError(f"{name} must be a floating-point tensor [..., query_pos, key_pos], got {shown}",
                                  argument=name)
    if pattern.shape != grad.shape:
        raise TLBackwardError(f"pattern {tuple(pattern.shape)} and grad {tuple(grad.shape)} must have the same "
                              "shape", argument="grad")
    if isinstance(scale, Tensor):
        scale = scale.to(device=grad.device, dtype=grad.dtype)
    else:
        scale = checks.finite_float(scale, "scale", positive=True, hint="the attention scale s")
    if grad_of == "pattern":
        r = (pattern * grad).sum(-1, keepdim=True)
        ra = pattern * (grad - r) / scale
    else:
        ra = grad / scale
    ra = ra.masked_fill(pattern == 0, 0.0)
    if keep is not None:
        ra = ra.masked_fill(~keep, 0.0)
    return ra


def frobenius(maps: Float[Tensor, "... query_pos key_pos"]) -> Float[Tensor, "..."]:
    """‖map‖_F over the last two dims (the paper's head score)."""
    return maps.pow(2).sum((-2, -1)).sqrt()


@dataclass(frozen=True, repr=False, kw_only=True)
class ReversedAttention(RAContext):
    """RA maps and forward patterns of the requested layers for a batch of prompts.

    ``maps``/``patterns``: ``Float[layer, batch, head, query_pos, key_pos]`` (query heads for GQA;
    ``layer`` runs over :attr:`layers` in order), fp32, zero at padding; the pass's layers, scales,
    input and metric are :class:`~tl_backward.attention.reduced.RAContext`'s fields. Means over a
    dataset (:meth:`mean`, :func:`mean_over`) have batch 1, ``n_examples`` prompts averaged,
    ``align`` set, ``metric`` the mean loss, and the first prompt's tokens for display.
    """

    maps: Float[Tensor, "layer batch head query_pos key_pos"]
    patterns: Float[Tensor, "layer batch head query_pos key_pos"]
    n_examples: int | None = None
    align: str | None = None

    def __repr__(self) -> str:
        L, B, H, Q, K = self.maps.shape
        kind = f"mean of {self.n_examples}, align={self.align!r}" if self.align else f"batch {B}"
        return (f"ReversedAttention(layers={list(self.layers)}, {kind}, {H} heads, {Q}x{K} positions, "
                f"metric={float(self.metric):.4g})")

    # --------------------------------------------------------------------------- indexing
    def _row(self, row: int) -> int:
        n = self.maps.shape[1]
        if not checks.is_int(row) or not 0 <= row < n:
            raise TLBackwardError(f"row must be an int in 0..{n - 1} (a prompt of the batch), got {row!r}",
                                  argument="row")
        return int(row)

    def map(self, layer: int, head: int, row: int = 0, *, which: str = "reversed") -> Float[Tensor, "q k"]:
        """One head's RA map (or forward pattern, ``which="forward"``) over ``row``'s real tokens."""
        src = self._source(which)
        head = checks.head_index(head, src.shape[2], "head", "this result")
        row = self._row(row)
        n = int(self.mask[row].sum())
        return src[self.layer_index(layer), row, head, :n, :n]

    def _source(self, which: str) -> Tensor:
        if which == "reversed":
            return self.maps
        if which == "forward":
            return self.patterns
        raise TLBackwardError(f"which must be 'reversed' (RA maps) or 'forward' (attention patterns), got "
                              f"{which!r}", argument="which")

    # --------------------------------------------------------------------------- ranking
    def head_norms(self, which: str = "reversed", *, per_example: bool = False) -> Tensor:
        """Frobenius norm per head: ``[layer, head]`` (mean over the batch -- the paper's score is the
        mean over examples), or ``[layer, batch, head]`` with ``per_example=True``.
        ``which="forward"`` gives the forward-pattern baseline ‖P‖_F."""
        norms = frobenius(self._source(which))
        return norms if per_example else norms.mean(1)

    def top_heads(self, k: int = 10, which: str = "reversed") -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest mean norm, as ``(layer, head, norm)``, descending."""
        return top_of(self.head_norms(which), self.layers, k)

    # --------------------------------------------------------------------------- aggregation
    def mean(self, align: str = "exact") -> "ReversedAttention":
        """Element-wise mean over the batch (see :func:`tl_backward.attention.mean_over`).

        ``align="exact"``: every prompt must have the same token length (the reference's rule).
        ``align="end"``: positions are counted from each prompt's last token and the maps are cropped
        to the shortest prompt (mixed lengths)."""
        acc = MeanAccumulator(align)
        acc.add(self)
        return acc.result()

    # --------------------------------------------------------------------------- rendering
    def render(self, k: int = 10, row: int = 0, *, title: str | None = None):
        """Page: layer × head norm heatmaps (‖RA‖_F purple, ‖P‖_F green), then the top-``k`` heads'
        RA maps on a signed scale centred at 0 (negative red = helpful, positive blue) and their
        forward patterns (0..1), for prompt ``row``."""
        return reversed_attention_page(self, k=k, row=row, title=title)


# ------------------------------------------------------------------------ streaming means
ALIGNS = ("exact", "end")


def check_align(align: str) -> str:
    return checks.one_of(align, "align", ALIGNS, hint="'exact': same-length prompts; 'end': count positions "
                         "from the last token, crop to the shortest prompt")


class MeanAccumulator:
    """Running element-wise sums of RA maps and patterns over results added with :meth:`add`."""

    def __init__(self, align: str = "exact"):
        self.align = check_align(align)
        self.n = 0
        self.length: int | None = None
        self.sum_maps: Tensor | None = None
        self.sum_patterns: Tensor | None = None
        self.metric = 0.0
        self.first: tuple[Tensor, list[str], Tensor] | None = None  # tokens, str_tokens, lengths of row 0
        self.layers: tuple[int, ...] | None = None
        self.scales: tuple[float, ...] | None = None
        self.n_layers: int | None = None

    def add(self, ra: ReversedAttention) -> None:
        if ra.align is not None:
            raise TLBackwardError("add per-prompt results, not means (this result is already averaged)",
                                  argument="ra")
        if self.layers is None:
            self.layers, self.scales, self.n_layers = ra.layers, ra.scales, ra.n_layers
        elif ra.layers != self.layers:
            raise TLBackwardError(f"results cover different layers: {list(ra.layers)} vs {list(self.layers)}",
                                  argument="layers")
        lengths = ra.mask.sum(1)
        if self.align == "exact":
            n = check_one_length([*lengths.tolist(), *([self.length] if self.length else [])])
        else:
            n = min(int(lengths.min()), self.length or 10**9)
        maps = cropped(ra.maps, self.align, lengths, n).sum(1, keepdim=True)
        pats = cropped(ra.patterns, self.align, lengths, n).sum(1, keepdim=True)
        if self.sum_maps is None:
            self.sum_maps, self.sum_patterns = maps, pats
            self.first = (ra.tokens[0], ra.str_tokens[0], lengths[0])
        else:
            if n < self.length:  # a shorter prompt arrived: keep the last n positions of the sums
                self.sum_maps = self.sum_maps[..., -n:, -n:]
                self.sum_patterns = self.sum_patterns[..., -n:, -n:]
            self.sum_maps = self.sum_maps + maps
            self.sum_patterns = self.sum_patterns + pats
        self.length = n
        self.n += ra.maps.shape[1]
        self.metric += float(ra.metric)

    def result(self) -> ReversedAttention:
        if self.n == 0:
            raise TLBackwardError("nothing to average: add at least one result", argument="prompts")
        n = self.length
        tokens, str_tokens, length = self.first
        start = int(length) - n  # exact: 0 (all prompts share the length)
        return ReversedAttention(
            maps=self.sum_maps / self.n, patterns=self.sum_patterns / self.n, layers=self.layers,
            scales=self.scales, tokens=tokens[start:start + n][None].clone(),
            mask=torch.ones(1, n, dtype=torch.bool), last=torch.tensor([n - 1]),
            str_tokens=[list(str_tokens[start:start + n])], metric=torch.tensor(self.metric / self.n),
            n_examples=self.n, align=self.align, n_layers=self.n_layers,
        )


def reversed_attention(
    model: Any,
    input: Any,
    target: Any = None,
    *,
    metric: Any = None,
    layers: int | Sequence[int] | None = None,
    prepend_bos: bool | None = None,
    keep: str = "maps",
    top_k: int = 16,
) -> ReversedAttention | RANorms | RATopK:
    """Reversed Attention of every head of ``layers`` (None = all) from one forward + backward.

    ``input``: a string, a list of strings (right-padded; each row's loss at its own last token)
    or token ids ``[batch, pos]``. Pass exactly one of ``target`` (a word such as ``" Paris"`` or a
    token id; NLL at the last prompt position, summed over the batch; a multi-token target is
    appended and teacher-forced) or ``metric`` (``tl_backward.metrics.logit_diff(...)`` or any
    callable ``(logits, tokens) -> scalar``). ``keep="maps"`` returns :class:`ReversedAttention`
    (every layer's maps and patterns, ``L·B·H·T²`` floats each); ``keep="norms"`` returns
    :class:`~tl_backward.attention.reduced.RANorms` (per-example ‖RA‖_F and ‖P‖_F per head) and
    ``keep="topk"`` :class:`~tl_backward.attention.reduced.RATopK` (the norms and the ``top_k`` largest
    ``|RA|`` entries per head with their positions), reduced layer by layer inside the backward, so
    that memory stays at the activation-gradient floor plus one layer's map.

    Each layer's map is read during the backward pass (:func:`tl_backward.core.stream.stream`, no
    cache) the way its attention bridge allows (:mod:`tl_backward.core.attention_kinds`):

    * score hook on the autograd path (GPT-2, NeoX, Llama-style, BLOOM, MPT, SmolLM3, Gemma, …):
      ``∂metric/∂hook_attn_scores / s_l``. With Gemma-2 attention soft-capping the hook sits after
      the cap, ``S = c·tanh(A/(s·c))``, so RA stays ∂L/∂A for the logits *before* the cap:
      ``RA = ∂L/∂S · (1 − tanh²(A/(s·c))) / s = ∂L/∂S · (1 − (S/c)²) / s``.
    * HF computes the softmax (GPT-J, OPT, GPT-Neo: the generic bridge): from ``z = P·V``,
      ``dP = ∂L/∂z · Vᵀ`` per head (kv heads expanded) and ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``,
      with P and V the forward values of ``hook_pattern``/``hook_v`` and ∂L/∂z from ``hook_z``.
    * the model multiplies the hooked pattern by V (``boot_native``, legacy TransformerLens
      checkpoints): ``dP = ∂L/∂hook_pattern`` and the same ``RA = P ⊙ (dP − rowsum(P ⊙ dP)) / s``.

    A map is exactly 0 wherever the pattern is 0 and is zeroed at padding. ``patterns`` are the
    tensors ``hook_pattern`` carried in that forward, kept by reference -- autograd saves them
    anyway -- and copied once at the end: under :func:`patch_attention` they include the patch on
    score-hook bridges, while on the generic bridge (patched at ``hook_z``) they are the model's
    softmax. Peak memory: see benchmarks/bench_reversed_attention.py.
    """
    keep, top_k = check_keep(keep, top_k)
    reduce = None if keep == "maps" else LayerReductions(keep, top_k)
    out = ra_pass(model, input, target, metric=metric, layers=layers, prepend_bos=prepend_bos, reduce=reduce)
    if reduce is not None:
        return reduce.result(out.patterns, out.n_heads, out.device, **out.fields)
    maps, patterns = _stack_layers(out.maps, out.patterns, len(out.fields["layers"]), out.fields["mask"],
                                   out.n_heads, out.device)
    return ReversedAttention(maps=maps, patterns=patterns, **out.fields)


@dataclass(frozen=True, repr=False)
class RAPass:
    """What :func:`ra_pass` leaves: ``maps[i]`` (RA of ``layers[i]``, only without a reducer) and
    ``patterns[i]`` (forward patterns of the layers the reducer did not take: all without one, else
    those the metric never reached), the :class:`RAContext` ``fields``, and where to stack."""

    maps: dict[int, Tensor]
    patterns: dict[int, Tensor]
    fields: dict[str, Any]
    n_heads: int
    device: torch.device

    def __repr__(self) -> str:
        return f"RAPass({len(self.fields['layers'])} layers, {len(self.maps)} maps kept)"


def ra_pass(model: Any, input: Any, target: Any = None, *, metric: Any = None,
            layers: int | Sequence[int] | None = None, prepend_bos: bool | None = None,
            reduce: Any = None) -> RAPass:
    """The one forward + backward of :func:`reversed_attention`. Each layer's map is computed when its
    gradient arrives and either kept or handed to ``reduce`` (``start(batch)``, then ``add(i, ra,
    pattern)`` with the fresh fp32 map, which it may modify), which releases it and the layer's
    forward tensors at once: :class:`~tl_backward.attention.reduced.LayerReductions` (norms, top-k),
    the dataset sums of :func:`tl_backward.attention.mean_over`."""
    adapter = get_adapter(model)
    layers = adapter.layers(layers)
    routes = [adapter.ra_route(l) for l in layers]
    metric = resolve_metric(target, metric)
    scales = [adapter.attn_scale(l) for l in layers]
    acts: dict[int, dict[str, Tensor]] = {i: {} for i in range(len(layers))}  # live forward tensors
    written: dict[int, Tensor] = {}  # layer index -> its RA map, filled during the backward

    def hold(i: int, kind: str):
        def fn(tensor: Tensor) -> None:
            acts[i][kind] = tensor
            if len(acts[i]) == len(routes[i].activations):  # all of this layer's tensors seen
                routes[i].check_forward(acts[i], layers[i])
        return fn

    def write_map(i: int, kind: str):
        def fn(grad: Tensor) -> None:
            # Computed here, mid-backward, while the graph's saved tensors are being freed: a buffer
            # for all layers allocated up front would sit on top of the forward's peak. fp32 whatever
            # the model's dtype (bf16 gradients are too noisy). Score route: ∂L/∂S is exactly 0 wherever
            # the softmax gave 0; the value route masks explicitly (dP is not 0 there).
            ra = routes[i].logit_grad(acts[i], {kind: grad}, scales[i])
            if reduce is None:
                written[i] = ra
            else:  # reduced now; the map and the layer's forward tensors are released here
                reduce.add(i, ra, acts.pop(i)["pattern"])
        return fn

    on_activation, on_gradient = {}, {}
    for i, (l, route) in enumerate(zip(layers, routes)):
        for kind in route.activations:
            on_activation[adapter.hook_name(kind, l)] = hold(i, kind)
        for kind in route.gradients:
            on_gradient[adapter.hook_name(kind, l)] = write_map(i, kind)
    run = stream(model, input, metric, prepend_bos=prepend_bos, on_activation=on_activation,
                 on_gradient=on_gradient, on_batch=None if reduce is None else reduce.start)
    seen = {i: a["pattern"] for i, a in acts.items()}
    acts.clear()
    fields = dict(layers=tuple(layers), scales=tuple(float(s) for s in scales), tokens=run.batch.tokens,
                  mask=run.batch.mask, last=run.batch.last, str_tokens=run.str_tokens, metric=run.metric,
                  n_layers=adapter.n_layers)
    # one device for the [layer, ...] result (the layers' may differ)
    return RAPass(written, seen, fields, adapter.n_heads, result_device(model))


def _route_names(adapter: Any, layer: int) -> tuple[dict[str, str], dict[str, str]]:
    """``({kind: hook name}`` of the activations, ``{kind: hook name})`` of the gradients RA reads at ``layer``."""
    route = adapter.ra_route(layer)
    return ({k: adapter.hook_name(k, layer) for k in route.activations},
            {k: adapter.hook_name(k, layer) for k in route.gradients})


def ra_hook_names(model: Any, layers: int | Sequence[int] | None = None) -> list[str]:
    """The hook points :func:`reversed_attention_from_cache` reads, for ``capture(names=...)``: per layer
    ``hook_pattern`` and ``hook_attn_scores`` where the score hook is on the autograd path, else
    ``hook_pattern``, ``hook_v`` and ``hook_z`` (see :func:`reversed_attention`)."""
    adapter = get_adapter(model)
    names: list[str] = []
    for l in adapter.layers(layers):
        act_names, grad_names = _route_names(adapter, l)
        names += [n for n in (*act_names.values(), *grad_names.values()) if n not in names]
    return names


def reversed_attention_from_cache(model: Any, cache: Any, *,
                                  layers: int | Sequence[int] | None = None) -> ReversedAttention:
    """:func:`reversed_attention` read off a :func:`~tl_backward.capture` cache instead of its own pass.

    The same maps from the cache's activations and gradients (e.g. RA_l = ``cache.grad(hook_attn_scores
    of l) / s_l`` on score-hook bridges), patterns = ``cache[hook_pattern of l]``, zeroed at padding
    exactly as :func:`reversed_attention` does; ``metric`` is the cache's. Lets several analyses share
    one forward + backward (:func:`tl_backward.report.build_report`). The cache must hold
    :func:`ra_hook_names` of ``layers``.
    """
    adapter = get_adapter(model)
    layers = adapter.layers(layers)
    require_hooks(cache, ra_hook_names(model, layers), "ra_hook_names(model, layers)")
    scales = [adapter.attn_scale(l) for l in layers]
    written, seen = {}, {}
    for i, l in enumerate(layers):
        act_names, grad_names = _route_names(adapter, l)
        acts = {k: cache[n] for k, n in act_names.items()}
        adapter.ra_route(l).check_forward(acts, l)
        written[i] = adapter.ra_route(l).logit_grad(acts, {k: cache.grad(n) for k, n in grad_names.items()},
                                                    scales[i])
        seen[i] = acts["pattern"]
    maps, patterns = _stack_layers(written, seen, len(layers), cache.mask, adapter.n_heads, result_device(model))
    return ReversedAttention(
        maps=maps, patterns=patterns, layers=tuple(layers), scales=tuple(float(s) for s in scales),
        tokens=cache.tokens, mask=cache.mask, last=cache.last, str_tokens=cache.str_tokens, metric=cache.metric,
        n_layers=adapter.n_layers,
    )


def _stack_layers(written: dict[int, Tensor], seen: dict[int, Tensor], n_layers: int, mask: Tensor,
                  n_heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[layer, batch, head, q, k]`` fp32 maps and patterns on ``device`` from per-layer tensors (each
    on its own layer's device), zero at padding.

    Assembled layer by layer, dropping each source as it is copied, so at most one layer is doubled.
    A layer without a map (the metric does not depend on it) gets ∂L/∂A = 0."""
    B, T = mask.shape
    shape = (n_layers, B, n_heads, T, T)
    # Padding: zero padded query rows and key columns (their RA is already 0; their patterns are not).
    drop = None if bool(mask.all()) else ~(mask[:, None, :, None] & mask[:, None, None, :]).to(device)
    maps = torch.empty(shape, dtype=torch.float32, device=device)
    for i in range(n_layers):
        if i in written:
            maps[i] = on(written.pop(i), device)
        else:
            maps[i].zero_()
        if drop is not None:
            maps[i].masked_fill_(drop, 0.0)
    patterns = torch.empty(shape, dtype=torch.float32, device=device)
    for i in range(n_layers):
        patterns[i] = on(seen.pop(i), device)
        if drop is not None:
            # compat mode: fully masked (padding) rows are NaN; they are zeroed with the padding.
            patterns[i].nan_to_num_(nan=0.0).masked_fill_(drop, 0.0)
    return maps, patterns
