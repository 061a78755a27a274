"""The one logit-lens readout of tl_backward: d_model vectors read through the final norm and the
unembedding, in vocabulary tiles.

For vectors ``v: Float[Tensor, "rows d_model"]`` (residual states, gradient factors, weight rows)::

    logits(v) = ln_final(v) · W_U + b_U          W_U: [d_model, vocab], b_U: [vocab]
    LL(v)     = softmax(logits(v))               (the logit lens, with the model's real final
                                                  norm, gain and bias included)

:class:`Unembed` holds ``(W_U, b_U, ln_final)`` (``Unembed.of(adapter)`` takes them from a
:class:`~tl_backward.core.adapter.ModelAdapter`, whose ``unembed`` delegates here) and
:meth:`Unembed.readout` returns, per row, the statistics Backward Lens (Katz et al., EMNLP 2024),
the VISIT flow graphs (Katz & Belinkov, 2023) and the report read:

* the ``k`` highest logits (descending) and the ``k`` lowest (ascending: least probable first) with
  their token ids;
* for each requested target id t: its logit, ``rank(t) = #{j : logit_j > logit_t}`` (0 = most
  probable; TransformerLens's ``target_ranks`` convention) and, on request,
  ``bottom_rank(t) = #{j : logit_j < logit_t}``;
* with ``softmax=True``: ``log Z = logsumexp_j logit_j`` (so every probability is
  ``exp(logit − log Z)``) and the entropy ``H = −Σ_j p_j log₂ p_j`` in bits.

The ``[rows, vocab]`` logits never exist at once: rows go in chunks of ``row_chunk`` and each chunk
meets ``W_U`` one ``[row_chunk, vocab_chunk]`` tile at a time; top/bottom-k lists are merged across
tiles, rank counts summed, and log Z and H accumulated online (rescaled to the running maximum).
Softmax is monotone, so logit and probability orders (ranks, top-k) agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_backward.errors import TLBackwardError

from . import checks
from .device import on

__all__ = ["Readout", "Unembed", "readout", "logits_readout", "normalize_rows", "entropy_bits", "as_targets",
           "TILE_ELEMENTS", "ROW_CHUNK"]

# Tile sizes (tuned with benchmarks/bench_backward_lens.py and bench_flow_graph.py on 2 shared CPU
# cores): few, large tiles win, because every tensor op is a parallel region whose barrier costs
# dearly when cores are contended. The vocabulary chunk fills TILE_ELEMENTS (e.g. 1536 rows x 10912
# tokens; the full GPT-2-small [1536, 50257] block would be 309 MB).
TILE_ELEMENTS = 1 << 24  # 64 MB of fp32 logits per tile (plus one or two buffers of the same size)
ROW_CHUNK = 2048
BLOCK = 32  # block width of the blocked top-k (see _tile_topk)
LOG2 = math.log(2)


@dataclass(frozen=True)
class Readout:
    """Per-row logit-lens statistics of :meth:`Unembed.readout` (``rows`` vectors, ``m`` targets).

    ``top_*`` descending, ``bottom_*`` ascending (least probable first). ``ranks``: #tokens with a
    strictly larger logit than each target; ``bottom_ranks``: strictly smaller (None unless asked).
    ``log_z`` and ``entropy`` (bits) exist with ``softmax=True``; the ``*_probs`` properties need them.
    """

    top_ids: Int[Tensor, "rows k"]
    top_logits: Float[Tensor, "rows k"]
    bottom_ids: Int[Tensor, "rows k"]
    bottom_logits: Float[Tensor, "rows k"]
    target_logits: Float[Tensor, "rows m"]
    ranks: Int[Tensor, "rows m"]
    bottom_ranks: Int[Tensor, "rows m"] | None = None
    log_z: Float[Tensor, " rows"] | None = None
    entropy: Float[Tensor, " rows"] | None = None

    def __repr__(self) -> str:
        rows, k = self.top_ids.shape
        soft = ", log Z and entropy" if self.log_z is not None else ""
        return f"Readout({rows} rows, top/bottom {k}, {self.ranks.shape[1]} targets{soft})"

    def _probs(self, logits: Tensor) -> Tensor:
        if self.log_z is None:
            raise TLBackwardError("probabilities need log Z: call readout(..., softmax=True)", argument="softmax")
        return (logits - self.log_z[:, None]).exp()

    @property
    def top_probs(self) -> Float[Tensor, "rows k"]:
        return self._probs(self.top_logits)

    @property
    def bottom_probs(self) -> Float[Tensor, "rows k"]:
        return self._probs(self.bottom_logits)

    @property
    def target_probs(self) -> Float[Tensor, "rows m"]:
        return self._probs(self.target_logits)

    def to(self, device: str | torch.device) -> "Readout":
        return Readout(*(None if t is None else t.to(device) for t in (
            self.top_ids, self.top_logits, self.bottom_ids, self.bottom_logits, self.target_logits, self.ranks,
            self.bottom_ranks, self.log_z, self.entropy)))


@dataclass(frozen=True, repr=False)
class Unembed:
    """The unembedding ``v ↦ f(norm(v) · W_U + b_U)`` (``norm`` None: the vectors are already normed;
    ``f`` = ``transform``, the model's own output transform, None: identity).

    ``W_U: [d_model, vocab]``, ``b_U: [vocab]`` (None: no bias), ``norm``: the final norm as a
    callable ``[..., d_model] -> [..., d_model]`` (e.g. ``ModelAdapter.ln_final``).
    """

    W_U: Float[Tensor, "d_model vocab"]
    b_U: Float[Tensor, " vocab"] | None = None
    norm: Callable[[Tensor], Tensor] | None = None
    # The model's elementwise, increasing post-unembedding transform (Cohere's logit_scale, Granite's
    # 1/logits_scaling, a final soft-cap), applied to every logit; None = identity.
    transform: Callable[[Tensor], Tensor] | None = None

    def __repr__(self) -> str:
        d, V = self.W_U.shape
        return f"Unembed(W_U [{d}, {V}], bias {self.b_U is not None}, final norm {self.norm is not None})"

    @classmethod
    def of(cls, adapter: Any) -> "Unembed":
        """The model's own readout: ``adapter.ln_final``, ``adapter.W_U``, ``adapter.b_U`` and
        ``adapter.logits_transform``."""
        return cls(adapter.W_U, adapter.b_U, adapter.ln_final, getattr(adapter, "logits_transform", None))

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]

    def normed(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """``norm(v)`` in fp32 on ``W_U``'s device (the norm may sit on another device of a
        dispatched model; it moves its input there itself, see ModelAdapter.ln_final)."""
        v = on(v, self.W_U)
        return on((self.norm(v) if self.norm is not None else v).float(), self.W_U)

    @torch.no_grad()
    def logits(self, v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        """The full logits ``norm(v) · W_U + b_U`` (for few vectors; see :meth:`readout` for many)."""
        out = self.normed(v) @ self.W_U.float()
        out = out if self.b_U is None else out + self.b_U.float().to(out.device)
        return out if self.transform is None else self.transform(out)

    @torch.no_grad()
    def probs(self, v: Float[Tensor, "rows d_model"], rows_per_chunk: int = 64) -> Float[Tensor, "rows vocab"]:
        """The full distributions ``LL(v)``, ``rows_per_chunk`` rows at a time (the result is
        ``[rows, vocab]``: use :meth:`readout` when a summary per row is enough)."""
        _check_positive(rows_per_chunk, "rows_per_chunk")
        parts = [torch.softmax(self.logits(v[i:i + rows_per_chunk]), -1) for i in range(0, len(v), rows_per_chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, self.d_vocab, device=self.W_U.device)

    @torch.no_grad()
    def readout(self, v: Float[Tensor, "rows d_model"], *, k: int, targets: Any = None, softmax: bool = False,
                bottom_ranks: bool = False, normalize: bool = False, vocab_chunk: int | None = None,
                row_chunk: int = ROW_CHUNK) -> Readout:
        """Top-k / bottom-k, target ranks (and log Z, entropy) of every row of ``v``; see the module.

        ``targets``: None, one id for every row, ``Int[rows]`` or ``Int[rows, m]``. ``normalize``
        L2-normalises each row before the norm (:func:`normalize_rows`). Memory: two or three
        ``[row_chunk, vocab_chunk]`` fp32 tiles (default ``vocab_chunk`` fills :data:`TILE_ELEMENTS`,
        balanced over the vocabulary). Target logits come from a dot product with their own
        ``W_U`` column; each target's own tile entry is left out of its counts, so rounding
        differences between that dot product and the tile matmul cannot rank a token against itself.
        """
        d, vocab = self.W_U.shape
        if not isinstance(v, Tensor) or v.ndim != 2 or v.shape[1] != d:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise TLBackwardError(f"vectors must be [rows, d_model={d}] to meet W_U [{d}, {vocab}]; got {shape}",
                                  argument="vectors")
        _check_k(k, vocab)
        for name, value in (("vocab_chunk", vocab_chunk), ("row_chunk", row_chunk)):
            if value is not None:
                _check_positive(value, name)
        rows = v.shape[0]
        ids = as_targets(targets, rows, vocab).to(self.W_U.device)
        # [vocab, d] contiguous rows make every vocabulary tile one contiguous block (no copy for
        # GPT-2's tied W_U = W_Eᵀ or an nn.Linear lm_head, whose W_U is already such a transpose).
        WT = self.W_U.float().T.contiguous()
        b_U = None if self.b_U is None or not bool(self.b_U.any()) else self.b_U.float().to(WT.device).contiguous()
        opts = dict(k=k, softmax=softmax, bottom=bottom_ranks)
        parts, buffer = [], None
        for r0 in range(0, rows, row_chunk):
            hr = self.normed(normalize_rows(v[r0:r0 + row_chunk]) if normalize else v[r0:r0 + row_chunk])
            if vocab_chunk is None:
                vocab_chunk = _balanced_chunk(vocab, max(BLOCK, TILE_ELEMENTS // hr.shape[0]))
            idr = ids[r0:r0 + row_chunk]
            thr = torch.einsum("rd,rmd->rm", hr, WT[idr]) + (0 if b_U is None else b_U[idr])
            thr = thr if self.transform is None else self.transform(thr)
            acc = _Tiles(thr, idr, min(vocab_chunk, vocab), **opts)
            if buffer is None or buffer.shape[0] != hr.shape[0]:
                buffer = torch.empty(hr.shape[0], min(vocab_chunk, vocab), device=WT.device)
            for c0 in range(0, vocab, vocab_chunk):
                tile = _tile(hr, WT, b_U, c0, min(c0 + vocab_chunk, vocab), buffer)
                acc.add(tile if self.transform is None else self.transform(tile), c0)
            parts.append(acc.result())
        return _concat(parts, rows, k, ids.shape[1], softmax, bottom_ranks, WT.device)


def readout(source: Any, v: Float[Tensor, "rows d_model"], **options: Any) -> Readout:
    """:meth:`Unembed.readout` of ``source``: an :class:`Unembed` or a model adapter."""
    unembed = source if isinstance(source, Unembed) else Unembed.of(source)
    return unembed.readout(v, **options)


@torch.no_grad()
def logits_readout(logits: Float[Tensor, "rows vocab"], *, k: int, targets: Any = None, softmax: bool = True,
                   bottom_ranks: bool = False) -> Readout:
    """The statistics of :meth:`Unembed.readout` for logits already computed (e.g. the model's own
    output at the last position), by the same tile reduction; target logits are read off ``logits``."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise TLBackwardError("logits must be a [rows, vocab] tensor", argument="logits")
    rows, vocab = logits.shape
    _check_k(k, vocab)
    logits = logits.float().contiguous()
    ids = as_targets(targets, rows, vocab).to(logits.device)
    acc = _Tiles(logits.gather(1, ids), ids, vocab, k=k, softmax=softmax, bottom=bottom_ranks)
    acc.add(logits, 0)
    return _concat([acc.result()], rows, k, ids.shape[1], softmax, bottom_ranks, logits.device)


def normalize_rows(v: Float[Tensor, "rows d"]) -> Float[Tensor, "rows d"]:
    """``v / ‖v‖`` per row, the normalised lens (Backward Lens appendix): tiny gradient vectors,
    whose variance falls below the final norm's eps, would otherwise all project like the zero
    vector. The norm is taken in fp64, so even subnormal fp32 rows reach unit norm; zero rows stay zero."""
    v64 = v.double()
    return (v64 / v64.norm(dim=-1, keepdim=True).clamp_min(1e-300)).to(v.dtype if v.is_floating_point() else torch.float32)


def entropy_bits(p: Float[Tensor, "... vocab"]) -> Float[Tensor, "..."]:
    """``H(p) = −Σ p log₂ p`` of full distributions (0·log 0 = 0)."""
    return -(p * p.clamp_min(1e-45).log()).sum(-1) / LOG2


def as_targets(targets: Any, rows: int, vocab: int, argument: str = "targets") -> Int[Tensor, "rows m"]:
    """``targets`` (None, an int for every row, ``[rows]`` or ``[rows, m]`` ids) as ``[rows, m]``."""
    if targets is None:
        return torch.zeros(rows, 0, dtype=torch.long)
    if isinstance(targets, bool):
        raise TLBackwardError(f"{argument} must be token ids, not a bool", argument=argument)
    if isinstance(targets, int):
        targets = torch.full((rows, 1), targets, dtype=torch.long)
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TLBackwardError(f"{argument} must be an int or an integer tensor of token ids", argument=argument)
    if targets.ndim == 1 and targets.shape[0] == rows:
        targets = targets[:, None]
    if targets.ndim != 2 or targets.shape[0] != rows:
        raise TLBackwardError(f"{argument} must be [{rows}, m] (or [{rows}], or one int), got {tuple(targets.shape)}",
                              argument=argument)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise TLBackwardError(f"{argument} must lie in [0, {vocab}) (the vocabulary)", argument=argument)
    return targets.long()


class _Tiles:
    """Running statistics of one row chunk, fed one ``[rows, C]`` logit tile at a time."""

    def __init__(self, thr: Tensor, ids: Tensor, width: int, *, k: int, softmax: bool, bottom: bool):
        n, device = thr.shape[0], thr.device
        self.thr, self.ids, self.k, self.softmax = thr, ids, k, softmax
        # scratch for the comparison masks, then for tile − max
        self.mask = torch.empty(n, width, device=device) if ids.shape[1] or softmax else None
        self.ones = torch.ones(width, device=device)
        self.above = torch.zeros(n, ids.shape[1], dtype=torch.float64, device=device)
        self.below = torch.zeros_like(self.above) if bottom else None
        self.top = self.bot = None
        self.max = self.sum = self.dot = None  # online softmax: max, Σ e^(l−max), Σ e^(l−max)(l−max)

    def add(self, tile: Tensor, c0: int) -> None:
        k, C = self.k, tile.shape[1]
        v1, i1 = _tile_topk(tile, k, largest=True)
        v2, i2 = _tile_topk(tile, k, largest=False)
        self.top = _merge(self.top, (v1, i1 + c0), k, largest=True)
        self.bot = _merge(self.bot, (v2, i2 + c0), k, largest=False)
        m = self.ids.shape[1]
        if m:
            inside = (self.ids >= c0) & (self.ids < c0 + C)
            own = tile.gather(1, (self.ids - c0).clamp(0, C - 1))
        for j in range(m):
            # Count logits beyond the threshold as a float mask times ones: a matrix-vector product
            # runs far faster on CPU than a bool reduction (exact below 2^24 per tile).
            t = self.thr[:, j:j + 1]
            self.above[:, j] += torch.gt(tile, t, out=self.mask[:, :C]) @ self.ones[:C]
            if self.below is not None:
                self.below[:, j] += torch.lt(tile, t, out=self.mask[:, :C]) @ self.ones[:C]
        if m:
            self.above -= (inside & (own > self.thr)).double()
            if self.below is not None:
                self.below -= (inside & (own < self.thr)).double()
        if self.softmax:
            self._softmax(tile, v1[:, 0])

    def _softmax(self, tile: Tensor, tile_max: Tensor) -> None:
        new_max = tile_max.double() if self.max is None else torch.maximum(self.max, tile_max.double())
        shifted = torch.sub(tile, new_max.float()[:, None], out=self.mask[:, :tile.shape[1]])
        # fp32 row sums (torch sums in cascades: error ~eps·log n); sum(dtype=float64) would first
        # copy the whole tile to fp64. The running totals across tiles are kept in fp64.
        e = shifted.exp()
        s = e.sum(1).double()
        u = e.mul_(shifted).sum(1).double()
        if self.max is not None:  # rescale the running sums from the old maximum to the new one
            shift = self.max - new_max
            scale = shift.exp()
            s, u = s + self.sum * scale, u + (self.dot + shift * self.sum) * scale
        self.max, self.sum, self.dot = new_max, s, u

    def result(self) -> tuple[Tensor | None, ...]:
        (tv, ti), (bv, bi) = self.top, self.bot
        below = None if self.below is None else self.below.round().long()
        log_z = entropy = None
        if self.softmax:
            log_z = (self.max + self.sum.log()).float()
            entropy = ((self.sum.log() - self.dot / self.sum) / LOG2).float()
        return ti, tv, bi, bv, self.thr, self.above.round().long(), below, log_z, entropy


def _tile(h: Tensor, WT: Tensor, b_U: Tensor | None, c0: int, c1: int, buffer: Tensor) -> Tensor:
    """Logits of ``h`` against vocabulary columns ``c0:c1``, written into ``buffer`` when it fits."""
    C = c1 - c0
    tile = torch.mm(h, WT[c0:c1].T, out=buffer[:, :C]) if C == buffer.shape[1] else h @ WT[c0:c1].T
    if b_U is not None:
        tile += b_U[c0:c1]
    return tile


def _concat(parts: list[tuple], rows: int, k: int, m: int, softmax: bool, bottom: bool, device: Any) -> Readout:
    if not parts:  # no rows
        z = lambda *s, dt=torch.float32: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
        return Readout(z(0, k, dt=torch.long), z(0, k), z(0, k, dt=torch.long), z(0, k), z(0, m),
                       z(0, m, dt=torch.long), z(0, m, dt=torch.long) if bottom else None,
                       z(0) if softmax else None, z(0) if softmax else None)
    cols = list(zip(*parts))
    return Readout(*(None if c[0] is None else torch.cat(c) for c in cols))


def _balanced_chunk(vocab: int, limit: int) -> int:
    """A chunk width <= ``limit`` (a multiple of BLOCK) splitting ``vocab`` into near-equal tiles."""
    n_tiles = -(-vocab // limit)
    width = -(-vocab // n_tiles)
    return min(vocab, -(-width // BLOCK) * BLOCK)


def _tile_topk(tile: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Top-k (or bottom-k) of each row of a tile, sorted.

    Blocked: the k best elements of a row lie in the k blocks with the best block maximum (any
    element outside them is beaten by k block maxima), so one cheap ``amax``/``amin`` pass over
    the tile plus a top-k over ``k·BLOCK`` candidates replaces a full top-k pass.
    """
    r, C = tile.shape
    C0 = C - C % BLOCK
    if C0 // BLOCK < 4 * k:
        return tile.topk(min(k, C), dim=1, largest=largest)
    if C0 < C:  # ragged last tile: blocked part + the < BLOCK leftover columns, merged
        v, i = _tile_topk(tile[:, :C0], k, largest)
        v2, i2 = tile[:, C0:].topk(min(k, C - C0), dim=1, largest=largest)
        return _merge((v, i), (v2, i2 + C0), k, largest)
    blocks = tile.view(r, C // BLOCK, BLOCK)
    best = blocks.amax(-1) if largest else blocks.amin(-1)
    _, bidx = best.topk(k, dim=1, largest=largest)  # [r, k] block ids
    cand = blocks.gather(1, bidx[:, :, None].expand(r, k, BLOCK)).reshape(r, k * BLOCK)
    vals, pos = cand.topk(k, dim=1, largest=largest)
    return vals, bidx.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK


def _merge(running: tuple[Tensor, Tensor] | None, new: tuple[Tensor, Tensor], k: int,
           largest: bool) -> tuple[Tensor, Tensor]:
    """Merge a tile's ``(values, ids)`` candidates into the running k best (sorted)."""
    vals, ids = new
    if running is not None:
        vals, ids = torch.cat([running[0], vals], 1), torch.cat([running[1], ids], 1)
    v, pos = vals.topk(min(k, vals.shape[1]), dim=1, largest=largest)
    return v, ids.gather(1, pos)


def _check_k(k: Any, vocab: int) -> None:
    checks.count(k, "k", minimum=1, maximum=vocab, hint="the vocabulary size")


def _check_positive(value: Any, name: str) -> None:
    checks.count(value, name, minimum=1)
