"""Forward-side attention interventions as context managers (hooks removed on exit, also on error).

* :func:`patch_attention` -- the paper's attention patching: ``P' = P + η·Δ`` at every patched
  layer, *after* the softmax (at ``hook_pattern``; on HF-delegating bridges -- GPT-J, OPT, GPT-Neo --
  whose ``hook_pattern`` is off the autograd path, as ``z' = (P + η·Δ)·V`` at ``hook_z``), with no renormalisation, clipping or re-softmax
  (rows of ``P + η·RA`` still sum to 1 since RA rows sum to 0; ``P + η·P̄`` rows sum to 1 + η;
  entries may go negative). Negative η is the descent direction for an NLL's RA.
* :func:`zero_heads` -- zero-ablate heads by zeroing their slice of ``hook_z`` (the o-projection
  bias b_O is kept), the perturbation study's ablation; weights are never touched.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from tl_backward.core import checks
from tl_backward.core.adapter import get_adapter
from tl_backward.core.device import param_dtype
from tl_backward.core.lock import model_lock
from tl_backward.errors import TLBackwardError

from .reversed import ReversedAttention

__all__ = ["patch_attention", "zero_heads"]


def _delta_by_layer(adapter: Any, delta: Any, layers: Any) -> dict[int, Tensor]:
    """Resolve ``delta`` to ``{model layer: Float[batch|1, head, q, k]}``."""
    if isinstance(delta, ReversedAttention):
        maps, own = delta.maps, list(delta.layers)
        chosen = own if layers is None else adapter.layers(layers)
        missing = [l for l in chosen if l not in own]
        if missing:
            raise TLBackwardError(f"layers {missing} are not in the delta (it covers layers {own})",
                                  argument="layers")
        return {l: maps[own.index(l)] for l in chosen}
    if not isinstance(delta, Tensor):
        raise TLBackwardError("delta must be a ReversedAttention result or a tensor [layer, head, q, k] "
                              f"(or [layer, batch, head, q, k]), got {type(delta).__name__}", argument="delta")
    if not delta.is_floating_point():
        raise TLBackwardError(f"delta must be a floating-point tensor, got {delta.dtype}", argument="delta")
    if delta.ndim == 4:
        delta = delta[:, None]
    if delta.ndim != 5:
        raise TLBackwardError(f"delta must have shape [layer, head, q, k] or [layer, batch, head, q, k], "
                              f"got {tuple(delta.shape)}", argument="delta")
    if layers is None:
        if delta.shape[0] != adapter.n_layers:
            raise TLBackwardError(f"delta covers {delta.shape[0]} layers but the model has {adapter.n_layers}: "
                                  "pass layers=[...] naming the layer of each slice", argument="layers")
        return {l: delta[l] for l in range(adapter.n_layers)}
    chosen = adapter.layers(layers)
    if delta.shape[0] == len(chosen):
        return dict(zip(chosen, delta))
    if delta.shape[0] == adapter.n_layers:
        return {l: delta[l] for l in chosen}
    raise TLBackwardError(f"delta covers {delta.shape[0]} layers; layers={chosen} names {len(chosen)} "
                          f"(the model has {adapter.n_layers})", argument="layers")


def _head_mask(heads: Any, adapter: Any, layers: Iterable[int]) -> dict[int, Tensor] | None:
    """``{layer: Bool[head]}`` of heads to patch; None = all. ``heads``: ints (every layer) or
    ``(layer, head)`` pairs; negative indices count from the end."""
    if heads is None:
        return None
    n_heads = adapter.n_heads
    items = [heads] if checks.is_int(heads) else heads
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TLBackwardError(f"heads must be None, head indices or (layer, head) pairs, got {heads!r:.60}",
                              argument="heads")
    items = list(items)
    if not items:
        raise TLBackwardError("heads is empty: pass None for all heads, head indices, or (layer, head) pairs",
                              argument="heads")
    layers = list(layers)
    masks = {l: torch.zeros(n_heads, dtype=torch.bool) for l in layers}
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            l = adapter.check_layer(item[0], "heads")
            h = checks.head_index(item[1], n_heads)
            if l not in masks:
                raise TLBackwardError(f"head {tuple(item)}: layer {l} is not patched (patched layers: {layers})",
                                      argument="heads")
            targets = [l]
        elif checks.is_int(item):
            h, targets = checks.head_index(item, n_heads), layers
        else:
            raise TLBackwardError(f"heads must hold head indices or (layer, head) pairs, got {item!r:.40}",
                                  argument="heads")
        for l in targets:
            masks[l][h] = True
    return masks


def _check_step(eta: float, layer: int, d: Tensor, dtype: torch.dtype) -> None:
    """``eta * d`` must be finite in the model's dtype, else the patched pattern would not be."""
    step = (eta * d).to(dtype)
    if not bool(torch.isfinite(step).all()):
        raise TLBackwardError(
            f"eta={eta:g} times the delta of layer {layer} (max |delta| {float(d.abs().max()):.3g}) is not "
            f"finite in {dtype}, so the patched pattern would not be: pass a smaller eta", argument="eta")


@checks.single_use
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
    means; the input should not be padded). Shape mismatches raise ``TLBackwardError``.

    Where the bridge's ``hook_pattern`` is off the autograd path (the generic, HF-delegating
    bridge: GPT-J, OPT, GPT-Neo) the patch is applied as ``z ↦ z + (η·Δ)·V`` at ``hook_z``, i.e.
    exactly ``z = (P + η·Δ)·V``. Under Gemma-2 soft-capping the patch still acts on P after the
    softmax, and ``delta`` = RA is ∂L/∂A for the logits before the cap
    (:func:`tl_backward.attention.reversed_attention`).

    Yields the per-layer deltas actually added (before η). Hooks are removed on exit, also when the
    block raises. Every argument is checked on entering the block: NaN/inf in the delta, or an η
    that makes ``η·Δ`` non-finite in the model's dtype, is refused. Each object returned by
    ``patch_attention(...)`` can be entered once.
    """
    adapter = get_adapter(model)
    eta = checks.finite_float(eta, "eta", hint="the patching strength η")
    checks.one_of(align, "align", ("exact", "end"))
    per_layer = _delta_by_layer(adapter, delta, layers)
    masks = _head_mask(heads, adapter, per_layer)
    dtype = param_dtype(model)
    deltas: dict[int, Tensor] = {}
    for l, d in per_layer.items():
        if d.shape[1] != adapter.n_heads:
            raise TLBackwardError(f"delta for layer {l} has {d.shape[1]} heads; the model has {adapter.n_heads} "
                                  "(query heads, also for GQA models)", argument="delta")
        if d.shape[-1] != d.shape[-2]:
            raise TLBackwardError(f"delta for layer {l} is {d.shape[-2]} x {d.shape[-1]}; expected square "
                                  "query x key maps", argument="delta")
        d = checks.finite_tensor(d.detach().float(), "delta", f"delta for layer {l}")
        if masks is not None:
            d = d * masks[l].to(d.device)[None, :, None, None]
        _check_step(eta, l, d, dtype)
        deltas[l] = d

    hooks = []
    for l, d in deltas.items():
        route = adapter.ra_route(l, "attention patching")
        step = _stepper(l, d, eta, align)
        if route.patch_kind == "pattern":
            hooks.append((adapter.hook_name("pattern", l), _pattern_hook(step)))
        else:
            hooks += _value_hooks(adapter, l, route, step)
    with model_lock(model), model.hooks(fwd_hooks=hooks):  # other threads wait (core/lock.py)
        yield deltas


def _stepper(layer: int, d: Tensor, eta: float, align: str):
    """``step(shape, device, dtype)``: ``η·Δ`` of ``layer`` as a ``[batch|1, head, q, k]`` tensor for a
    pattern of ``shape`` (zero outside the last n × n block under ``align="end"``), checked and cached."""
    cache: dict[tuple, Tensor] = {}

    def step(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        b, h, q, k = shape
        n = d.shape[-1]
        if d.shape[0] not in (1, b):
            raise TLBackwardError(f"patch_attention: delta for layer {layer} has batch {d.shape[0]} but the "
                                  f"input has {b} rows; use a delta with batch 1 (broadcast) or {b}",
                                  argument="delta")
        if align == "exact" and (q, k) != (n, n):
            raise TLBackwardError(
                f"patch_attention: delta for layer {layer} covers {n} x {n} positions but the input's "
                f"pattern is {q} x {k}: patch prompts with the same token length as the maps, or "
                "use align='end' with a smaller delta", argument="delta")
        if align == "end" and (n > q or n > k):
            raise TLBackwardError(f"patch_attention: delta for layer {layer} covers {n} positions but the "
                                  f"input has only {q} queries x {k} keys", argument="delta")
        key = (device, dtype, q, k)
        if key not in cache:
            full = (eta * d).to(device=device, dtype=dtype)
            if align == "end":
                full = torch.zeros((d.shape[0], h, q, k), device=device, dtype=dtype)
                full[..., q - n:, k - n:] = (eta * d).to(device=device, dtype=dtype)
            cache[key] = full
        return cache[key]

    return step


def _pattern_hook(step):
    """``hook_pattern`` ↦ ``P + η·Δ`` (bridges that multiply the hooked pattern by V)."""
    def hook(pattern: Tensor, hook: Any) -> Tensor:
        return pattern + step(tuple(pattern.shape), pattern.device, pattern.dtype)
    return hook


def _value_hooks(adapter: Any, layer: int, route: Any, step) -> list[tuple[str, Any]]:
    """Generic (HF-delegating) bridges: their ``hook_pattern`` fires after HF has used P, so the patch
    goes where it is on the autograd path: ``z ↦ z + (η·Δ)·V``, i.e. ``z = (P + η·Δ)·V`` per head,
    with V read from ``hook_v`` in the same forward."""
    seen: dict[str, Tensor] = {}

    def keep_v(v: Tensor, hook: Any) -> None:
        seen["v"] = v

    def patch_z(z: Tensor, hook: Any) -> Tensor:  # z: [batch, pos, head, d_head]
        v = seen.pop("v")
        shape = (z.shape[0], adapter.n_heads, z.shape[1], v.shape[1])
        return z + route.mix(step(shape, z.device, z.dtype), v).to(z.dtype)

    return [(adapter.hook_name("v", layer), keep_v), (adapter.hook_name("z", layer), patch_z)]


@checks.single_use
def zero_heads(model: Any, heads: Iterable[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """Within the block, the listed ``(layer, head)`` pairs output zero: their ``hook_z`` slice is
    zeroed, so they add nothing to the residual stream except the shared o-projection bias.
    Negative layers and heads count from the end; an empty list ablates nothing (the baseline of
    a sweep). Yields the sorted list of ablated heads; each object returned by ``zero_heads(...)``
    can be entered once."""
    adapter = get_adapter(model)
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise TLBackwardError(f"heads must be a list of (layer, head) pairs, got {heads!r:.60}", argument="heads")
    chosen: dict[int, list[int]] = {}
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TLBackwardError(f"heads must be (layer, head) pairs, got {item!r:.40}", argument="heads")
        l = adapter.check_layer(item[0], "heads")
        h = checks.head_index(item[1], adapter.n_heads)
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
