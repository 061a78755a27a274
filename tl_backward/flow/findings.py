"""VISIT's findings as checks you can run on any model (Katz & Belinkov 2023, §6; docs/flow_graphs.md).

* :func:`ln_filter` — layer norm as a semantic filter: how LN1/LN2 move the logit-lens
  distribution, Δprob = LL(ln(x)) − LL(x) over the vocabulary, against random vectors of the same
  norm passed through the same norm (the control).
* :func:`regularisation_neurons` — MLP neurons that sit among a layer's top activations for most
  prompts, with the entropy, norm and weight outliers of their W_out projection.

Both run forward passes only (``run_with_cache`` under ``no_grad``, caching just the hooks used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import ModelAdapter, get_adapter
from tl_backward.core.device import module_device, param_dtype
from tl_backward.core.readout import entropy_bits
from tl_backward.errors import TLBackwardError

# Rows per full-distribution chunk: 64 x 50k fp32 probabilities = 13 MB.
CHUNK = 64


# ------------------------------------------------------------------------------------- helpers
def _check_prompts(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TLBackwardError("prompts must be a non-empty list of strings", argument="prompts")
    return list(prompts)


def _positions(batch, position: int) -> Tensor:
    """Per-row position: each row's last real token (position=-1) or a fixed index."""
    position = checks.count(position, "position", minimum=-1, hint="-1 for each prompt's last token")
    if position == -1:
        return batch.last
    shortest = int(batch.last.min()) + 1
    if not 0 <= position < shortest:
        raise TLBackwardError(f"position {position} is out of range: the shortest prompt has {shortest} tokens "
                              "(use -1 for each prompt's last token)", argument="position")
    return torch.full_like(batch.last, position)


def _collect(ad: ModelAdapter, prompts: list[str], names: list[str], position: int, batch_size: int,
             prepend_bos: bool | None) -> dict[str, Tensor]:
    """Activations at ``names`` at each prompt's position, stacked [n_prompts, ...] (forward only)."""
    checks.count(batch_size, "batch_size", minimum=1)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for start in range(0, len(prompts), batch_size):
        batch = ad.tokenize(prompts[start:start + batch_size], prepend_bos)
        pos = _positions(batch, position)
        _, acts = ad.forward_values(batch.tokens, names)  # derived points (a HookedTransformer's ln*.hook_out) too
        rows = torch.arange(len(pos))
        for n in names:
            out[n].append(acts[n][rows, pos.to(acts[n].device)].cpu())
        del acts
    return {n: torch.cat(v) for n, v in out.items()}


def _overlap(a: Tensor, b: Tensor, k: int) -> Tensor:
    """I_k = |top-k(a) ∩ top-k(b)| / k per row."""
    ta, tb = a.topk(k, -1).indices, b.topk(k, -1).indices
    return (ta[:, :, None] == tb[:, None, :]).any(-1).float().sum(-1) / k


# ------------------------------------------------------------------------------------- LN filter
@dataclass(frozen=True)
class LNFilter:
    """Layer norm as a semantic filter at ``layer``/``which``.

    ``delta``: mean over prompts of LL(ln(x)) − LL(x) per vocabulary token (averaged per prompt —
    the paper does not say whether it averages or uses the mean hidden state).
    ``delta_random``: the same for random vectors r ~ N(0, I) rescaled to ‖x‖ (one per prompt).
    ``overlap``/``overlap_random``: mean I_k(LL(x), LL(ln x)) with k = ``k``.
    ``entropy``: mean entropy (bits) of LL(x) and LL(ln x) (keys "x", "ln_x", "r", "ln_r").
    """

    layer: int
    which: str
    n_prompts: int
    delta: Float[Tensor, " vocab"]
    delta_random: Float[Tensor, " vocab"]
    overlap: float
    overlap_random: float
    k: int
    entropy: dict[str, float]
    vocab: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (f"LNFilter(layer {self.layer} {self.which}, {self.n_prompts} prompts: top-{self.k} overlap "
                f"{self.overlap:.3f} (random {self.overlap_random:.3f}))")

    def top_gain(self, n: int = 10, random: bool = False) -> list[tuple[str, float]]:
        """Tokens whose probability LN raises most (mean Δprob)."""
        d = self.delta_random if random else self.delta
        idx = d.topk(n).indices
        return [(self.vocab[i] if self.vocab else str(int(i)), float(d[i])) for i in idx]

    def top_loss(self, n: int = 10, random: bool = False) -> list[tuple[str, float]]:
        """Tokens whose probability LN lowers most."""
        d = self.delta_random if random else self.delta
        idx = (-d).topk(n).indices
        return [(self.vocab[i] if self.vocab else str(int(i)), float(d[i])) for i in idx]

    def group_shift(self, token_ids: Sequence[int]) -> tuple[float, float]:
        """Summed mean Δprob of a token group (e.g. function words): (real, random control)."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        return float(self.delta[ids].sum()), float(self.delta_random[ids].sum())

    def summary(self, n: int = 8) -> str:
        fmt = lambda pairs: ", ".join(f"{t!r} {d:+.2e}" for t, d in pairs)  # noqa: E731
        return "\n".join([
            f"LN as a filter: layer {self.layer} {self.which}, {self.n_prompts} prompts",
            f"  gains : {fmt(self.top_gain(n))}",
            f"  losses: {fmt(self.top_loss(n))}",
            f"  random control gains : {fmt(self.top_gain(n, True))}",
            f"  random control losses: {fmt(self.top_loss(n, True))}",
            f"  I_{self.k}(LL x, LL ln x) = {self.overlap:.3f} (random vectors {self.overlap_random:.3f})",
            f"  entropy bits: x {self.entropy['x']:.2f} -> ln x {self.entropy['ln_x']:.2f}; "
            f"random {self.entropy['r']:.2f} -> {self.entropy['ln_r']:.2f}",
        ])


def ln_filter(model: Any, prompts: Sequence[str] | str, *, layer: int, which: str = "ln1", position: int = -1,
              k: int = 50, seed: int = 0, batch_size: int = 16, prepend_bos: bool | None = None) -> LNFilter:
    """Compare LL(x) with LL(ln(x)) for the layer's LN1 (``which="ln1"``, x = resid_pre) or LN2
    (``"ln2"``, x = resid_mid; resid_pre for parallel blocks), at each prompt's ``position``.

    LL(v) = softmax(ln_final(v)·W_U + b_U) (real final norm, bias included); ln(x) is read at
    ``ln*.hook_out`` (post-affine). Control: per prompt one random r ~ N(0, I)·‖x‖/‖r‖ through the
    same norm module (seeded). Returns :class:`LNFilter`.
    """
    ad = get_adapter(model)
    layer = ad.check_layer(layer)
    checks.one_of(which, "which", ("ln1", "ln2"))
    checks.count(k, "k", minimum=1, maximum=ad.d_vocab)
    prompts = _check_prompts(prompts)
    if which == "ln1" or ad.parallel_blocks:
        x_name = ad.hook_name("resid_pre", layer)
    else:
        x_name = ad.hook_name("resid_mid", layer)
    y_name = f"blocks.{layer}.{which}.hook_out"
    acts = _collect(ad, prompts, [x_name, y_name], position, batch_size, prepend_bos)
    x, y = acts[x_name], acts[y_name]
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(x.shape, generator=gen)
    r = r * (x.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True))
    norm = getattr(model.blocks[layer], which)
    with torch.no_grad():  # on the norm's own device (its block's, on a dispatched model)
        ln_r = norm(r.to(device=module_device(norm), dtype=param_dtype(model))).float().cpu()
    px, py, pr, plr = (ad.unembedding.probs(v, CHUNK).cpu() for v in (x, y, r, ln_r))
    ids = list(range(ad.d_vocab))
    return LNFilter(
        layer=layer, which=which, n_prompts=len(prompts), delta=(py - px).mean(0), delta_random=(plr - pr).mean(0),
        overlap=float(_overlap(px, py, k).mean()), overlap_random=float(_overlap(pr, plr, k).mean()), k=k,
        entropy={"x": float(entropy_bits(px).mean()), "ln_x": float(entropy_bits(py).mean()),
                 "r": float(entropy_bits(pr).mean()), "ln_r": float(entropy_bits(plr).mean())},
        vocab=tuple(ad.decode_ids(ids)),
    )


# ------------------------------------------------------------------------------------- regularisation neurons
@dataclass(frozen=True)
class RegNeuron:
    """One candidate: how often it is in its layer's top activations (signed and |h|), and its
    W_out row: LL entropy (bits) vs the layer's median, norm percentile, max|w| / rms(w)."""

    layer: int
    neuron: int
    freq_signed: float
    freq_abs: float
    entropy: float
    layer_median_entropy: float
    norm: float
    norm_percentile: float
    outlier_ratio: float
    top_tokens: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"RegNeuron(L{self.layer} n{self.neuron}: signed {self.freq_signed:.0%}, |h| {self.freq_abs:.0%}, "
                f"entropy {self.entropy:.2f} bits (median {self.layer_median_entropy:.2f}), top {list(self.top_tokens[:3])!r:.40})")


@dataclass(frozen=True)
class RegularisationNeurons:
    """``freq_signed``/``freq_abs`` [layer, d_mlp]: fraction of prompts in which each neuron is among
    the ``top`` largest activations h (signed) or |h|; ``candidates``: neurons above
    ``min_fraction`` in either, most frequent first."""

    layers: tuple[int, ...]
    top: int
    min_fraction: float
    n_prompts: int
    freq_signed: Float[Tensor, "layer d_mlp"]
    freq_abs: Float[Tensor, "layer d_mlp"]
    candidates: tuple[RegNeuron, ...]

    def __repr__(self) -> str:
        names = ", ".join(f"L{c.layer}n{c.neuron}" for c in self.candidates[:4])
        more = ", …" if len(self.candidates) > 4 else ""
        return (f"RegularisationNeurons(layers {list(self.layers)!r:.30}, top {self.top} in > {self.min_fraction:.0%} of "
                f"{self.n_prompts} prompts: {len(self.candidates)} candidates{': ' + names + more if names else ''})")

    def summary(self) -> str:
        lines = [f"regularisation neurons: top-{self.top} activations in > {self.min_fraction:.0%} of "
                 f"{self.n_prompts} prompts"]
        for c in self.candidates:
            lines.append(f"  L{c.layer} n{c.neuron}: signed {c.freq_signed:.0%}, |h| {c.freq_abs:.0%}; "
                         f"W_out entropy {c.entropy:.2f} bits (layer median {c.layer_median_entropy:.2f}), "
                         f"norm pct {c.norm_percentile:.0f}, max|w|/rms {c.outlier_ratio:.1f}, "
                         f"top {list(c.top_tokens)}")
        if not self.candidates:
            lines.append("  none")
        return "\n".join(lines)


def in_top_fraction(h: Float[Tensor, "prompt d_mlp"], top: int) -> Float[Tensor, " d_mlp"]:
    """Fraction of rows in which each column is among the row's ``top`` largest values."""
    idx = h.topk(top, dim=-1).indices
    hits = torch.zeros_like(h).scatter_(1, idx, 1.0)
    return hits.mean(0)


def regularisation_neurons(model: Any, prompts: Sequence[str] | str, *, layers: int | Sequence[int] | None = None,
                           top: int = 100, min_fraction: float = 0.85, position: int = -1, baseline: int = 256,
                           seed: int = 0, batch_size: int = 16, prepend_bos: bool | None = None,
                           k: int = 5) -> RegularisationNeurons:
    """Find neurons (``mlp.hook_post`` h) that are among each layer's ``top`` activations at
    ``position`` in more than ``min_fraction`` of ``prompts`` — by signed h and by |h| (the paper
    does not say which). For each candidate, project W_out[i] with the logit lens: entropy in bits
    (compared with the median over ``baseline`` random neurons of the layer), top-``k`` tokens,
    ‖W_out[i]‖ percentile in the layer and max|W_out[i]| / rms(W_out[i]) (weight outliers).
    """
    ad = get_adapter(model)
    layer_list = ad.layers(layers)
    ad.require_dense_mlp(layer_list, "regularisation_neurons")
    checks.count(top, "top", minimum=1, maximum=ad.d_mlp - 1, hint=f"below d_mlp={ad.d_mlp}")
    checks.probability(min_fraction, "min_fraction", open_zero=True)
    checks.count(baseline, "baseline", minimum=1, hint="random neurons for the median entropy")
    checks.count(k, "k", minimum=1, maximum=ad.d_vocab)
    prompts = _check_prompts(prompts)
    names = [ad.hook_name("mlp_post", l) for l in layer_list]
    acts = _collect(ad, prompts, names, position, batch_size, prepend_bos)
    freq_s = torch.stack([in_top_fraction(acts[n], top) for n in names])
    freq_a = torch.stack([in_top_fraction(acts[n].abs(), top) for n in names])
    gen = torch.Generator().manual_seed(seed)
    found = []
    for li, l in enumerate(layer_list):
        mask = (freq_s[li] > min_fraction) | (freq_a[li] > min_fraction)
        chosen = mask.nonzero().flatten().tolist()
        if not chosen:
            continue
        W_out = ad.W_out(l)
        norms = W_out.norm(dim=-1)
        sample = torch.randperm(ad.d_mlp, generator=gen)[: min(baseline, ad.d_mlp)]
        unembed = ad.unembedding
        base_ent = unembed.readout(W_out[sample], k=1, softmax=True).entropy.cpu()
        lens = unembed.readout(W_out[chosen], k=min(k, ad.d_vocab), softmax=True).to("cpu")
        ents, tops = lens.entropy, lens.top_ids
        rms = W_out[chosen].pow(2).mean(-1).sqrt()
        outlier = W_out[chosen].abs().max(-1).values / rms.clamp_min(1e-30)
        for c, i in enumerate(chosen):
            found.append(RegNeuron(
                layer=l, neuron=i, freq_signed=float(freq_s[li, i]), freq_abs=float(freq_a[li, i]),
                entropy=float(ents[c]), layer_median_entropy=float(base_ent.median()), norm=float(norms[i]),
                norm_percentile=float((norms < norms[i]).float().mean() * 100), outlier_ratio=float(outlier[c]),
                top_tokens=tuple(ad.decode_ids(tops[c]))))
    found.sort(key=lambda c: -max(c.freq_signed, c.freq_abs))
    return RegularisationNeurons(layers=tuple(layer_list), top=top, min_fraction=float(min_fraction),
                                 n_prompts=len(prompts), freq_signed=freq_s, freq_abs=freq_a,
                                 candidates=tuple(found))
