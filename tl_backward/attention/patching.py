"""Forward-side attention interventions as context managers (hooks removed on exit, also on error).

* :func:`patch_attention` -- the paper's attention patching: ``P' = P + η·Δ`` at every patched
  layer's ``hook_pattern``, *after* the softmax, with no renormalisation, clipping or re-softmax
  (rows of ``P + η·RA`` still sum to 1 since RA rows sum to 0; ``P + η·P̄`` rows sum to 1 + η;
  entries may go negative). Negative η is the descent direction for an NLL's RA.
* :func:`zero_heads` -- zero-ablate heads by zeroing their slice of ``hook_z`` (the o-projection
  bias b_O is kept), the perturbation study's ablation; weights are never touched.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from tl_backward.core.adapter import get_adapter
from tl_backward.core.lock import model_lock

from .reversed import ReversedAttention

__all__ = ["patch_attention", "zero_heads"]


def _eta(eta: Any) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
        raise TypeError(f"eta must be a finite number (the patching strength η), got {eta!r}")
    return float(eta)


def _delta_by_layer(adapter: Any, delta: Any, layers: Any) -> dict[int, Tensor]:
    """Resolve ``delta`` to ``{model layer: Float[batch|1, head, q, k]}``."""
    if isinstance(delta, ReversedAttention):
        maps, own = delta.maps, list(delta.layers)
        chosen = own if layers is None else adapter.layers(layers)
        missing = [l for l in chosen if l not in own]
        if missing:
            raise ValueError(f"layers {missing} are not in the delta (it covers layers {own})")
        return {l: maps[own.index(l)] for l in chosen}
    if not isinstance(delta, Tensor):
        raise TypeError("delta must be a ReversedAttention result or a tensor [layer, head, q, k] "
                        f"(or [layer, batch, head, q, k]), got {type(delta).__name__}")
    if not delta.is_floating_point():
        raise TypeError(f"delta must be a floating-point tensor, got {delta.dtype}")
    if delta.ndim == 4:
        delta = delta[:, None]
    if delta.ndim != 5:
        raise ValueError(f"delta must have shape [layer, head, q, k] or [layer, batch, head, q, k], "
                         f"got {tuple(delta.shape)}")
    if layers is None:
        if delta.shape[0] != adapter.n_layers:
            raise ValueError(f"delta covers {delta.shape[0]} layers but the model has {adapter.n_layers}: "
                             "pass layers=[...] naming the layer of each slice")
        return {l: delta[l] for l in range(adapter.n_layers)}
    chosen = adapter.layers(layers)
    if delta.shape[0] == len(chosen):
        return dict(zip(chosen, delta))
    if delta.shape[0] == adapter.n_layers:
        return {l: delta[l] for l in chosen}
    raise ValueError(f"delta covers {delta.shape[0]} layers; layers={chosen} names {len(chosen)} "
                     f"(the model has {adapter.n_layers})")


def _head_mask(heads: Any, n_heads: int, layers: Iterable[int]) -> dict[int, Tensor] | None:
    """``{layer: Bool[head]}`` of heads to patch; None = all. ``heads``: ints (every layer) or
    ``(layer, head)`` pairs."""
    if heads is None:
        return None
    items = list(heads) if not isinstance(heads, int) else [heads]
    if not items:
        raise ValueError("heads is empty: pass None for all heads, head indices, or (layer, head) pairs")
    layers = list(layers)
    masks = {l: torch.zeros(n_heads, dtype=torch.bool) for l in layers}
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            l, h = int(item[0]), int(item[1])
            if l not in masks:
                raise ValueError(f"head {tuple(item)}: layer {l} is not patched (patched layers: {layers})")
            targets = [l]
        elif isinstance(item, int) and not isinstance(item, bool):
            h, targets = item, layers
        else:
            raise TypeError(f"heads must hold head indices or (layer, head) pairs, got {item!r}")
        if not 0 <= h < n_heads:
            raise ValueError(f"head {h} is out of range: the model has heads 0..{n_heads - 1}")
        for l in targets:
            masks[l][h] = True
    return masks


@contextlib.contextmanager
def patch_attention(
    model: Any,
    delta: ReversedAttention | Tensor,
    *,
    eta: float,
    layers: int | Sequence[int] | None = None,
    heads: Any = None,
    align: str = "exact",
) -> Iterator[dict[int, Tensor]]:
    """Within the block, every forward adds ``eta * delta`` to the post-softmax attention pattern.

    ``delta``: a :class:`ReversedAttention` (its ``.maps``; a mean from ``.mean()``/``mean_over``
    for dataset patching), or a tensor ``[layer, head, q, k]`` / ``[layer, batch, head, q, k]`` --
    e.g. the forward-pattern mean ``mean.patterns`` (the paper's control; pass ``layers=mean.layers``
    unless it covers all layers). A tensor's layer axis covers all model layers, or the ``layers``
    given, in order. ``layers`` (None = all the delta covers) and ``heads`` (ints for every patched
    layer, or ``(layer, head)`` pairs) restrict the patch. A batch axis of 1 broadcasts over the
    input; otherwise it must equal the input's batch size.

    ``align="exact"``: the delta's q × k must equal the input's (same-length prompts). ``align="end"``:
    a smaller n × n delta is added to the last n query and key positions (for ``align="end"``
    means; the input should not be padded). Shape mismatches raise ``ValueError``.

    Yields the per-layer deltas actually added (before η). Hooks are removed on exit, also when the
    block raises.
    """
    adapter = get_adapter(model)
    eta = _eta(eta)
    if align not in ("exact", "end"):
        raise ValueError(f"align must be 'exact' or 'end', got {align!r}")
    per_layer = _delta_by_layer(adapter, delta, layers)
    masks = _head_mask(heads, adapter.n_heads, per_layer)
    deltas: dict[int, Tensor] = {}
    for l, d in per_layer.items():
        if d.shape[1] != adapter.n_heads:
            raise ValueError(f"delta for layer {l} has {d.shape[1]} heads; the model has {adapter.n_heads} "
                             "(query heads, also for GQA models)")
        if d.shape[-1] != d.shape[-2]:
            raise ValueError(f"delta for layer {l} is {d.shape[-2]} x {d.shape[-1]}; expected square "
                             "query x key maps")
        d = d.detach().float()
        if masks is not None:
            d = d * masks[l].to(d.device)[None, :, None, None]
        deltas[l] = d

    def make_hook(layer: int, d: Tensor):
        cache: dict[tuple, Tensor] = {}

        def hook(pattern: Tensor, hook: Any) -> Tensor:
            b, h, q, k = pattern.shape
            n = d.shape[-1]
            if d.shape[0] not in (1, b):
                raise ValueError(f"patch_attention: delta for layer {layer} has batch {d.shape[0]} but the "
                                 f"input has {b} rows; use a delta with batch 1 (broadcast) or {b}")
            if align == "exact" and (q, k) != (n, n):
                raise ValueError(
                    f"patch_attention: delta for layer {layer} covers {n} x {n} positions but the input's "
                    f"pattern is {q} x {k}: patch prompts with the same token length as the maps, or "
                    "use align='end' with a smaller delta")
            if align == "end" and (n > q or n > k):
                raise ValueError(f"patch_attention: delta for layer {layer} covers {n} positions but the "
                                 f"input has only {q} queries x {k} keys")
            key = (pattern.device, pattern.dtype)
            if key not in cache:
                cache[key] = (eta * d).to(device=pattern.device, dtype=pattern.dtype)
            step = cache[key]
            if align == "exact":
                return pattern + step
            out = pattern.clone()
            out[..., q - n:, k - n:] += step
            return out

        return hook

    hooks = [(adapter.hook_name("pattern", l), make_hook(l, d)) for l, d in deltas.items()]
    with model_lock(model), model.hooks(fwd_hooks=hooks):  # other threads wait (core/lock.py)
        yield deltas


@contextlib.contextmanager
def zero_heads(model: Any, heads: Iterable[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """Within the block, the listed ``(layer, head)`` pairs output zero: their ``hook_z`` slice is
    zeroed, so they add nothing to the residual stream except the shared o-projection bias.
    Yields the sorted list of ablated heads."""
    adapter = get_adapter(model)
    chosen: dict[int, list[int]] = {}
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"heads must be (layer, head) pairs, got {item!r}")
        l, h = adapter.check_layer(int(item[0])), int(item[1])
        if not 0 <= h < adapter.n_heads:
            raise ValueError(f"head {h} is out of range: the model has heads 0..{adapter.n_heads - 1}")
        chosen.setdefault(l, []).append(h)

    def make_hook(hs: list[int]):
        keep = torch.ones(adapter.n_heads)
        keep[hs] = 0.0

        def hook(z: Tensor, hook: Any) -> Tensor:  # z: [batch, pos, head, d_head]
            return z * keep.to(device=z.device, dtype=z.dtype)[:, None]

        return hook

    hooks = [(adapter.hook_name("z", l), make_hook(hs)) for l, hs in chosen.items()]
    with model_lock(model), model.hooks(fwd_hooks=hooks):  # other threads wait (core/lock.py)
        yield sorted((l, h) for l, hs in chosen.items() for h in hs)
