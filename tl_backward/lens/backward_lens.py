"""Backward Lens (Katz et al., EMNLP 2024): gradient factors read through the final norm and the
unembedding (docs/backward_lens.md).

For each layer, token and weight matrix, the factor that lives in ``d_model`` is projected with
the logit lens ``LL(v) = ln_final(v) @ W_U + b_U`` (the real final norm, bias included):

| module | projected | read |
|---|---|---|
| ``mlp_in`` (FF1), ``mlp_gate``, ``q``/``k``/``v``, ``router``, ``shared_in``/``shared_gate``/``shared_expert_gate`` | x (the module input) | top-k |
| ``mlp_out`` (FF2), ``o``, ``shared_out`` | δ (gradient at the module output) | bottom-k: descent adds −δ |

Bottom-k of LL(δ) is not top-k of LL(−δ) when the final norm or unembedding has a bias; like the
paper, tl_backward reports bottom-k of LL(δ). Every cell also reports the rank of the target (its
first token) and of the model's current top prediction at the row's last prompt position, and
the factor's norm (tiny norms project onto the norm's bias: read them with ``normalize=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import decode_ids, get_adapter
from tl_backward.core.device import result_device, stack_on
from tl_backward.core.metrics import target_nll
from tl_backward.core.readout import Unembed
from tl_backward.errors import TLBackwardError

from .factors import GradientFactors, gradient_factors
from .render import render_backward_lens

# module -> (projected side, reading direction)
READING = {
    "mlp_in": ("x", "top"), "mlp_gate": ("x", "top"), "q": ("x", "top"), "k": ("x", "top"),
    "v": ("x", "top"), "mlp_out": ("delta", "bottom"), "o": ("delta", "bottom"), "router": ("x", "top"),
    "shared_in": ("x", "top"), "shared_gate": ("x", "top"), "shared_out": ("delta", "bottom"),
    "shared_expert_gate": ("x", "top"),
}


@dataclass(frozen=True)
class LensReadout:
    """The lens of one module over ``layers × tokens``.

    ``top_ids/top_logits [layer, tokens, k]`` descending, ``bottom_ids/bottom_logits`` ascending
    (least probable first), ``target_rank``, ``pred_rank`` and ``norm`` ``[layer, tokens]``.
    ``read`` says which list carries the paper's reading (``"top"`` for x, ``"bottom"`` for δ).
    """

    module: str
    side: str
    read: str
    layers: tuple[int, ...]
    top_ids: Int[Tensor, "layer tokens k"]
    top_logits: Float[Tensor, "layer tokens k"]
    bottom_ids: Int[Tensor, "layer tokens k"]
    bottom_logits: Float[Tensor, "layer tokens k"]
    target_rank: Int[Tensor, "layer tokens"]
    pred_rank: Int[Tensor, "layer tokens"]
    norm: Float[Tensor, "layer tokens"]

    def __repr__(self) -> str:
        L, T, k = self.top_ids.shape
        return (f"LensReadout({self.module}: {self.side} read from the {self.read}, {L} layers × {T} tokens, "
                f"top/bottom {k})")

    @property
    def read_ids(self) -> Int[Tensor, "layer tokens k"]:
        """The ids in the paper's reading order (top-k for x, bottom-k for δ)."""
        return self.top_ids if self.read == "top" else self.bottom_ids


@dataclass(frozen=True)
class ImprintShift:
    """Predicted effect, at token ``token``, of a one-token SGD step ``W ← W − lr·x_t ⊗ δ_t`` on one
    layer's matrix (each layer separately, everything else fixed, same input re-run):

    * ``imprint [layer, d_mlp]``: change of W_in's output (pre-activation; the up projection for
      gated MLPs) = ``−lr‖x_t‖² δ_t`` with the FF1 factors;
    * ``shift [layer, d_model]``: change of the MLP output = ``−lr‖x_t‖² δ_t`` with the FF2 factors.

    Exact (linear in the updated matrix). None where the module was not computed.
    """

    layers: tuple[int, ...]
    token: int
    position: tuple[int, int]
    lr: float
    imprint: Float[Tensor, "layer d_mlp"] | None
    shift: Float[Tensor, "layer d_model"] | None

    def __repr__(self) -> str:
        parts = [f"{n} {list(t.shape)}" for n, t in (("imprint", self.imprint), ("shift", self.shift)) if t is not None]
        return f"ImprintShift(token {self.token} at {self.position}, lr {self.lr:g}, {len(self.layers)} layers; {', '.join(parts)})"


@dataclass(frozen=True)
class BackwardLens:
    """Result of :func:`backward_lens`: ``lens[module]`` is a :class:`LensReadout`.

    ``factors`` keeps the :class:`GradientFactors`; ``target_ids``/``pred_ids [batch]`` are each
    row's target (first token) and the model's argmax at the row's last prompt position.
    """

    factors: GradientFactors
    readouts: dict[str, LensReadout]
    target_ids: Int[Tensor, " batch"]
    pred_ids: Int[Tensor, " batch"]
    top_k: int
    normalize: bool
    d_vocab: int
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        n = len(self.target_ids)
        target = repr(self.decode(self.target_ids[:1])[0])[:24] if n == 1 else f"{n} targets"
        return (f"BackwardLens({', '.join(self.modules)}; {len(self.layers)} layers × {self.factors.n_tokens} "
                f"tokens; target {target}; top_k {self.top_k}; metric {float(self.factors.metric):.4g})")

    def __getitem__(self, module: str) -> LensReadout:
        if module not in self.readouts:
            raise KeyError(f"module {module!r} was not projected; available: {list(self.readouts)}")
        return self.readouts[module]

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.readouts)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.factors.layers

    @property
    def token_strs(self) -> list[str]:
        return self.factors.token_strs

    def decode(self, ids: Sequence[int] | Tensor) -> list[str]:
        """Token strings of vocabulary ids (:func:`tl_backward.core.adapter.decode_ids`)."""
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [checks.count(i, "ids", maximum=self.d_vocab - 1, hint="token ids of the vocabulary") for i in ids]
        return decode_ids(self.tokenizer, ids)

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` (negative counts from the end) on the layer axis."""
        layer = checks.layer_index(layer, self.factors.n_layers)
        if layer not in self.layers:
            raise TLBackwardError(f"layer {layer} was not computed; available layers: {list(self.layers)}",
                                  argument="layer")
        return self.layers.index(layer)

    def token_index(self, token: int | tuple[int, int]) -> int:
        """Index on the factors' token axis of ``token`` (an index, or a ``(batch, pos)`` pair)."""
        n = self.factors.n_tokens
        if isinstance(token, tuple) and len(token) == 2:
            hits = ((self.factors.positions[:, 0] == token[0]) & (self.factors.positions[:, 1] == token[1])).nonzero()
            if not len(hits):
                raise TLBackwardError(f"token (batch, pos) = {token} is padding or out of range", argument="token")
            return int(hits[0, 0])
        return checks.index(token, n, "token", "token")  # over the non-padding tokens

    def tokens(self, module: str, layer: int, token: int | tuple[int, int], which: str | None = None) -> list[str]:
        """The k tokens of one cell; ``which`` = "top" | "bottom" | None (the module's reading)."""
        r = self[module]
        which = which or r.read
        checks.one_of(which, "which", ("top", "bottom", None))
        ids = (r.top_ids if which == "top" else r.bottom_ids)[self.layer_index(layer), self.token_index(token)]
        return self.decode(ids)

    def imprint_shift(self, token_index: int | tuple[int, int], lr: float) -> ImprintShift:
        """Imprint (FF1) and shift (FF2) of a one-token SGD step at ``token_index`` (Katz et al., EMNLP 2024)."""
        t = self.token_index(token_index)
        lr = checks.finite_float(lr, "lr", hint="the SGD learning rate")
        have = [m for m in ("mlp_in", "mlp_out") if m in self.factors.modules]
        if any(self.factors[l, m].per_expert for l in self.layers for m in have):
            raise TLBackwardError("imprint/shift are defined for one dense MLP matrix per layer; these layers are "
                                  "mixtures of experts: use factors[l, m].expert(e).sgd_output_change(t, lr) per "
                                  "expert", argument="factors")
        if not have:
            raise TLBackwardError("imprint/shift need the MLP factors: call backward_lens(..., modules=('mlp_in', "
                                  "'mlp_out'))", argument="modules")
        out = {}
        for m in have:
            out[m] = stack_on([self.factors[l, m].sgd_output_change(t, lr)[t] for l in self.layers])
        b, p = self.factors.positions[t].tolist()
        return ImprintShift(layers=self.layers, token=t, position=(b, p), lr=lr,
                            imprint=out.get("mlp_in"), shift=out.get("mlp_out"))

    def render(self, modules: str | Sequence[str] | None = None, row: int = 0):
        """The paper's table (layers × tokens, ``top1 \\ bottom1``, colour = factor norm) per
        module, a target-rank-per-layer plot and per-layer norms, for batch row ``row``."""
        return render_backward_lens(self, modules=modules, row=row)


def backward_lens(
    model: Any,
    input: Any,
    target: Any,
    *,
    modules: str | Sequence[str] = ("mlp_in", "mlp_out"),
    layers: int | Sequence[int] | None = None,
    top_k: int = 5,
    normalize: bool = False,
    prepend_bos: bool | None = None,
) -> BackwardLens:
    """Project gradient factors of the target's NLL into the vocabulary.

    One forward + backward (:func:`gradient_factors`), then one chunked projection of every
    distinct d_model-sized factor (modules sharing an input, like q/k/v, are projected once).

    Args:
        model: a reconstructing ``TransformerBridge``.
        input: prompt(s) or token ids (see :func:`gradient_factors`).
        target: the target word or id(s); a list gives one target per prompt.
        modules / layers: as in :func:`gradient_factors`.
        top_k: tokens kept per cell and direction, in ``[1, d_vocab]``.
        normalize: L2-normalise each factor before ``ln_final`` (the paper's appendix lens).
        prepend_bos: None uses the model's default.
    """
    _check_lens_options(get_adapter(model), target, top_k, normalize)
    gf = gradient_factors(model, input, metric=target_nll(target), modules=modules, layers=layers,
                          prepend_bos=prepend_bos)
    return lens_from_factors(model, gf, target, top_k=top_k, normalize=normalize)


def lens_from_factors(model: Any, factors: GradientFactors, target: Any, *, top_k: int = 5,
                      normalize: bool = False) -> BackwardLens:
    """The projection half of :func:`backward_lens`, on factors already computed (e.g. by
    :func:`~tl_backward.lens.factors.factors_from_cache`, sharing a pass with other analyses).
    ``target`` labels the ranks (one per row, or one for all); the prediction is the argmax of the
    factors' own forward pass (``factors.last_logits``)."""
    ad = get_adapter(model)
    _check_lens_options(ad, target, top_k, normalize)
    target_ids = _row_targets(ad, target, factors.tokens.shape[0])
    pred_ids = factors.last_logits.argmax(-1).cpu()  # the model's prediction, from the same forward pass
    readouts = project_factors(ad, factors, target_ids, pred_ids, top_k=top_k, normalize=normalize)
    return BackwardLens(factors=factors, readouts=readouts, target_ids=target_ids, pred_ids=pred_ids,
                        top_k=top_k, normalize=normalize, d_vocab=ad.d_vocab,
                        tokenizer=getattr(model, "tokenizer", None))


def _check_lens_options(ad: Any, target: Any, top_k: Any, normalize: Any) -> None:
    checks.count(top_k, "top_k", minimum=1, maximum=ad.d_vocab, hint="tokens per cell, at most the vocabulary size")
    checks.flag(normalize, "normalize")
    if target is None:
        raise TLBackwardError("target is None: pass the target word (e.g. ' Paris') or its token id",
                              argument="target")


def project_factors(ad: Any, gf: GradientFactors, target_ids: Tensor, pred_ids: Tensor, *, top_k: int,
                    normalize: bool, **chunks: int) -> dict[str, LensReadout]:
    """The projection step of :func:`backward_lens`: every distinct d_model-sized factor of ``gf``
    through ``ln_final`` and the unembedding in one chunked pass; ranks of each row's target and
    prediction (``target_ids``/``pred_ids [batch]``), by :meth:`tl_backward.core.readout.Unembed.readout`.
    ``chunks``: its ``vocab_chunk``/``row_chunk``."""
    # One [layers, tokens, d_model] block per distinct projected tensor.
    blocks: list[Tensor] = []
    where: dict[str, int] = {}
    device = result_device(ad.model)  # each layer's factors sit on its own layer's device
    keys: dict[tuple, int] = {}
    for m in gf.modules:
        side = READING[m][0]
        vecs = []
        for l in gf.layers:
            vecs.append(gf[l, m].projected(side))  # shared by all heads; Σ over experts for their δ
        key = tuple((v.untyped_storage().data_ptr(), v.storage_offset()) for v in vecs)
        if key not in keys:
            keys[key] = len(blocks)
            blocks.append(stack_on(vecs, device))
        where[m] = keys[key]
    stacked = torch.stack(blocks)  # [blocks, layer, tokens, d_model]
    norms = stacked.norm(dim=-1)
    flat = stacked.reshape(-1, ad.d_model)
    rows_b = gf.positions[:, 0]
    ids = torch.stack([target_ids[rows_b], pred_ids[rows_b]], -1)  # [tokens, 2]
    ids = ids.expand(len(blocks) * len(gf.layers), *ids.shape).reshape(-1, 2)
    r = Unembed.of(ad).readout(flat, k=top_k, targets=ids, normalize=normalize, **chunks)
    shape = (len(blocks), len(gf.layers), gf.n_tokens)
    parts = {name: getattr(r, name).reshape(*shape, -1) for name in
             ("top_ids", "top_logits", "bottom_ids", "bottom_logits", "ranks")}
    readouts = {}
    for m in gf.modules:
        i = where[m]
        readouts[m] = LensReadout(
            module=m, side=READING[m][0], read=READING[m][1], layers=gf.layers,
            top_ids=parts["top_ids"][i], top_logits=parts["top_logits"][i],
            bottom_ids=parts["bottom_ids"][i], bottom_logits=parts["bottom_logits"][i],
            target_rank=parts["ranks"][i][..., 0], pred_rank=parts["ranks"][i][..., 1], norm=norms[i],
        )
    return readouts


def _row_targets(ad: Any, target: Any, n_rows: int) -> Int[Tensor, " batch"]:
    """First target token per row (one target for all rows, or a list/tuple of one per row, as
    in ``target_nll``)."""
    if isinstance(target, (list, tuple)):
        return torch.stack([ad.target_tokens(t)[0] for t in target])
    return ad.target_tokens(target)[:1].expand(n_rows).clone()
