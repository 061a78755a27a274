"""Reductions of Reversed Attention maps taken layer by layer inside the backward pass.

``reversed_attention(..., keep="norms" | "topk")`` hands each layer's map
``RA_l [batch, head, q, k]`` to a :class:`LayerReductions` the moment the layer's gradient
arrives; the map is reduced and dropped (and the layer's forward tensors released), so the peak
memory is the activation-gradient floor plus one layer's map instead of all layers' maps:

* ``"norms"`` -> :class:`RANorms`: per example and head ``‖RA_{l,h}‖_F`` and ``‖P_{l,h}‖_F`` over
  the real tokens (the paper's head score and its forward baseline, Katz & Wolf, NAACL 2025);
* ``"topk"`` -> :class:`RATopK`: the norms, plus the ``top_k`` entries of largest ``|RA_{l,h}|``
  per example and head, signed, with their (query, key) positions.

Both are exactly the reductions of ``keep="maps"``'s ``ReversedAttention.maps``/``patterns``
(tests/attention/test_ra_keep.py). The dataset means' crops (:func:`cropped`, :func:`aligned`,
:func:`check_one_length`) live here too, shared by ``MeanAccumulator`` and ``mean_over``'s sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.batch import Batch
from tl_backward.core.device import stack_on
from tl_backward.errors import TLBackwardError

__all__ = ["KEEPS", "LayerReductions", "RAContext", "RANorms", "RATopK", "aligned", "check_keep", "check_one_length",
           "cropped", "layer_position", "top_of"]

KEEPS = ("maps", "norms", "topk")


def check_keep(keep: Any, top_k: Any) -> tuple[str, int]:
    """``(keep, top_k)`` checked: keep in :data:`KEEPS`, top_k an int >= 1."""
    checks.one_of(keep, "keep", KEEPS, hint="'maps': every layer's RA maps and patterns; 'norms': per-head "
                  "‖RA‖_F and ‖P‖_F only; 'topk': the norms and the top_k largest |RA| edges per head")
    return keep, checks.count(top_k, "top_k", minimum=1)


def layer_position(layer: Any, layers: Sequence[int], n_layers: int | None) -> int:
    """Position of model layer ``layer`` (negative counts from the model's end) in ``layers``."""
    if n_layers is not None:
        layer = checks.layer_index(layer, n_layers)
    elif not checks.is_int(layer) or layer < 0:
        raise TLBackwardError(f"layer must be a non-negative int (this result does not know the model's "
                              f"layer count), got {layer!r}", argument="layer")
    if layer not in layers:
        raise TLBackwardError(f"layer {layer} was not computed; this result has layers {list(layers)}",
                              argument="layer")
    return list(layers).index(layer)


def top_of(norms: Float[Tensor, "layer head"], layers: Sequence[int], k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest entries of a ``[layer, head]`` table as ``(model layer, head, value)``, descending."""
    k = min(checks.count(k, "k", minimum=1), norms.numel())
    vals, idx = norms.flatten().topk(k)
    H = norms.shape[1]
    return [(layers[int(i) // H], int(i) % H, float(v)) for v, i in zip(vals, idx)]


@dataclass(frozen=True, repr=False, kw_only=True)
class RAContext:
    """What every Reversed Attention result records about its pass.

    ``layers``: the model layers computed, in order; ``scales[i]``: the attention scale of
    ``layers[i]``; ``tokens``/``mask``/``last``/``str_tokens``: the input actually run (a
    multi-token target is appended, teacher-forced); ``metric``: the (batch-summed) loss;
    ``n_layers``: the model's layer count, so that model layer ``-1`` can be looked up.
    """

    layers: tuple[int, ...]
    scales: tuple[float, ...]
    tokens: Int[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    str_tokens: list[list[str]]
    metric: Float[Tensor, ""]
    n_layers: int | None = None

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` (negative counts from the model's end) along ``layer``."""
        return layer_position(layer, self.layers, self.n_layers)


@dataclass(frozen=True, repr=False, kw_only=True)
class RANorms(RAContext):
    """Per-example head norms of Reversed Attention, without the maps.

    ``reversed_norms[i, b, h] = ‖RA_{layers[i], h}‖_F`` and ``forward_norms[i, b, h] = ‖P_{layers[i], h}‖_F``
    of prompt ``b`` over its real tokens (``Float[layer, batch, head]``, fp32; query heads for GQA);
    the other fields are :class:`RAContext`'s.
    """

    reversed_norms: Float[Tensor, "layer batch head"]
    forward_norms: Float[Tensor, "layer batch head"]

    def __repr__(self) -> str:
        L, B, H = self.reversed_norms.shape
        return (f"{type(self).__name__}(layers={list(self.layers)}, batch {B}, {H} heads, "
                f"{self.tokens.shape[1]} positions{self._extra()}, metric={float(self.metric):.4g})")

    def _extra(self) -> str:
        return ""

    def head_norms(self, which: str = "reversed", *, per_example: bool = False) -> Tensor:
        """Frobenius norm per head, as ``ReversedAttention.head_norms``: ``[layer, head]`` (mean over
        the batch) or ``[layer, batch, head]`` with ``per_example=True``; ``which="forward"``: ‖P‖_F."""
        checks.flag(per_example, "per_example")
        checks.one_of(which, "which", ("reversed", "forward"), hint="'reversed': ‖RA‖_F, 'forward': ‖P‖_F")
        norms = self.reversed_norms if which == "reversed" else self.forward_norms
        return norms if per_example else norms.mean(1)

    def top_heads(self, k: int = 10, which: str = "reversed") -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest mean norm, as ``(layer, head, norm)``, descending."""
        return top_of(self.head_norms(which), self.layers, k)


@dataclass(frozen=True, repr=False, kw_only=True)
class RATopK(RANorms):
    """:class:`RANorms` plus, per example and head, the ``top_k`` entries of largest ``|RA|``.

    ``values[i, b, h, j] = RA_{layers[i], h}[query[i, b, h, j], key[i, b, h, j]]`` of prompt ``b``
    (signed: negative = helpful edge), ordered by descending ``|value|``; ``top_k`` is at most
    ``pos²``. A prompt with fewer non-zero entries than ``top_k`` fills up with zeros at arbitrary
    positions (padding included).
    """

    values: Float[Tensor, "layer batch head top_k"]
    query: Int[Tensor, "layer batch head top_k"]
    key: Int[Tensor, "layer batch head top_k"]

    def _extra(self) -> str:
        return f", top {self.values.shape[-1]} edges per head"

    def edges(self, layer: int, head: int, row: int = 0) -> list[tuple[int, int, float]]:
        """One head's top edges for prompt ``row`` as ``(query_pos, key_pos, RA value)``, by ``|RA|``."""
        i = self.layer_index(layer)
        head = checks.head_index(head, self.values.shape[2], "head", "this result")
        row = checks.count(row, "row", maximum=self.values.shape[1] - 1)
        return [(int(q), int(k), float(v)) for q, k, v in
                zip(self.query[i, row, head], self.key[i, row, head], self.values[i, row, head])]


def _pair_mask(mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch 1 pos pos"]:
    return mask[:, None, :, None] & mask[:, None, None, :]


def pattern_norms(pattern: Float[Tensor, "batch head q k"], mask: Bool[Tensor, "batch pos"]) -> Tensor:
    """``‖P‖_F [batch, head]`` over each row's real tokens, without copying a padding-free pattern
    (the live forward tensor is never modified; compat mode's NaN padding rows are left out)."""
    mask = mask.to(pattern.device)
    rows = []
    for b in range(pattern.shape[0]):
        p = pattern[b]
        if not bool(mask[b].all()):
            p = p[:, mask[b]][:, :, mask[b]]
        rows.append(torch.linalg.vector_norm(p.float(), dim=(-2, -1)))
    return torch.stack(rows)


def top_edges(ra: Float[Tensor, "batch head q k"], k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, query, key)`` ``[batch, head, k]`` of the ``k`` largest ``|ra|`` per head, one head
    at a time so the temporary ``|ra|`` is one head's size."""
    T = ra.shape[-1]
    vals, idxs = [], []
    for h in range(ra.shape[1]):
        flat = ra[:, h].reshape(ra.shape[0], T * T)
        idx = flat.abs().topk(k, dim=-1).indices
        vals.append(flat.gather(-1, idx))
        idxs.append(idx)
    idx = torch.stack(idxs, 1)
    return torch.stack(vals, 1), idx // T, idx % T


class LayerReductions:
    """Collects :class:`RANorms`/:class:`RATopK` layer by layer during one backward pass.

    :meth:`start` gets the batch (before the forward), :meth:`add` each layer's fresh map (owned
    by the caller, zeroed in place at padding) and forward pattern, :meth:`result` fills in layers
    the metric does not reach (RA = 0) from their patterns and builds the result.
    """

    def __init__(self, keep: str, top_k: int):
        self.keep, self.top_k = keep, top_k
        self.mask: Tensor | None = None
        self.norms: dict[int, Tensor] = {}
        self.pattern_norms: dict[int, Tensor] = {}
        self.top: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

    def start(self, batch: Batch) -> None:
        self.mask = batch.mask

    def add(self, i: int, ra: Float[Tensor, "batch head q k"], pattern: Float[Tensor, "batch head q k"]) -> None:
        """Reduce layer ``i``'s map ``ra`` (fp32, modified in place) and its forward ``pattern``."""
        mask = self.mask.to(ra.device)
        if not bool(mask.all()):
            ra.masked_fill_(~_pair_mask(mask), 0.0)
        self.norms[i] = torch.linalg.vector_norm(ra, dim=(-2, -1))
        self.pattern_norms[i] = pattern_norms(pattern, mask)
        if self.keep == "topk":
            self.top[i] = top_edges(ra, min(self.top_k, ra.shape[-1] ** 2))

    def result(self, patterns: dict[int, Tensor], n_heads: int, device: torch.device, **fields: Any) -> RANorms:
        """The result over ``len(fields["layers"])`` layers, stacked on ``device`` (each layer's
        reductions sit on its own layer's device); ``patterns[i]``: the forward pattern of every layer
        :meth:`add` never saw."""
        n = len(fields["layers"])
        B, T = self.mask.shape
        for i in range(n):
            if i not in self.norms:  # the metric does not depend on this layer: ∂L/∂A = 0
                self.add(i, torch.zeros(B, n_heads, T, T, device=patterns[i].device), patterns[i])
        stack = lambda d, j=None: stack_on([d[i] if j is None else d[i][j] for i in range(n)], device)  # noqa: E731
        out = dict(reversed_norms=stack(self.norms), forward_norms=stack(self.pattern_norms), **fields)
        if self.keep == "norms":
            return RANorms(**out)
        return RATopK(values=stack(self.top, 0), query=stack(self.top, 1), key=stack(self.top, 2), **out)


def check_one_length(lengths: Sequence[int]) -> int:
    """The one token length ``align="exact"`` needs, refused when ``lengths`` hold several."""
    lens = sorted({int(l) for l in lengths})
    if len(lens) > 1:
        raise TLBackwardError(f"align='exact' needs prompts of one token length, got lengths {lens}: use prompts "
                              "with the same layout, or align='end' to count positions from the last token",
                              argument="align")
    return lens[0]


def cropped(x: Tensor, align: str, lengths: Tensor, n: int) -> Tensor:
    """``x [..., batch, head, q, k]`` cropped to ``n × n`` per row: the first n positions under
    ``align="exact"`` (one length, no padding), else each row's last n real ones (:func:`aligned`)."""
    return x[..., :n, :n] if align == "exact" else aligned(x, lengths, n)


def aligned(x: Tensor, lengths: Tensor, n: int) -> Tensor:
    """``x [..., batch, head, q, k]`` (batch at dim -4) cropped per row to the ``n × n`` block that
    ends at the row's last real token (``lengths[b]`` real tokens)."""
    rows = [x[..., b, :, int(l) - n:int(l), int(l) - n:int(l)] for b, l in enumerate(lengths)]
    return torch.stack(rows, dim=-4)
