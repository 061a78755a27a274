"""``segment_mask``: make every forward pass of a Bridge use the MAS mask, then restore causal.

Why a forward pre-hook on the wrapped HF model: every Bridge entry point (``model(tokens)``,
``run_with_cache`` -- which calls ``forward`` directly, bypassing module hooks on the Bridge --,
``run_with_hooks``, tl_backward's ``capture``) ends in one call of ``model.original_model``. A
pre-hook there sees the final token tensor and kwargs, so it can inject the 4-D keep-mask (which
reconstructing bridges treat as authoritative, no causal mask added) and position ids. A hook on
``hook_attn_scores`` could not do this: the causal mask is applied before it.

A ``transformer_lens.HookedTransformer`` (TransformerLens 3.x) has no HF module: every entry point
here dispatches it to ``hooked.py``, which shadows each layer's ``apply_causal_mask`` instead.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tl_backward.core.device import input_device

from ..core import checks
from ..core.adapter import get_adapter
from ..core.bridges import check_runnable
from ..core.compat import NativeModel, is_hooked_transformer
from ..core.lock import model_lock
from ..errors import TLBackwardError
from . import hooked
from .families import check_family, hf_attention_mask, hf_mask, run_masked
from .segments import Segments

_ACTIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


def hf_module(model: Any) -> torch.nn.Module:
    """The HF module every Bridge forward goes through (refuses non-HF / native bridges)."""
    if isinstance(model, Segments) or not isinstance(model, torch.nn.Module):
        raise TLBackwardError(f"model must be a TransformerBridge, got {type(model).__name__}", argument="model")
    hf = getattr(model, "original_model", None)
    if not isinstance(hf, torch.nn.Module):
        raise TLBackwardError(
            "MAS needs a reconstructing TransformerBridge booted with boot_transformers "
            "(boot_native uses the opposite bool-mask convention and is unsupported)", argument="model")
    if isinstance(hf, NativeModel):
        raise TLBackwardError(
            "MAS needs a bridge booted with boot_transformers: a boot_native (or legacy TransformerLens "
            "checkpoint) model ORs every attention mask with its causal mask and reads bool masks as True = "
            "masked, so a segment mask cannot lift causality there", argument="model")
    check_family(model)
    check_runnable(model)
    return hf


def forward_module(model: Any) -> torch.nn.Module:
    """The checked module a MAS forward goes through: a HookedTransformer itself
    (:func:`hooked.check_model`), a Bridge's HF module (:func:`hf_module`)."""
    if is_hooked_transformer(model):
        hooked.check_model(model)
        return model
    return hf_module(model)


def run_segments(model: Any, segments: Segments, **kwargs: Any) -> Any:
    """``model(segments.tokens, **kwargs)`` under the keep-mask ``segments.mask()`` with the segments'
    padding and positions (``segments`` on the input device; ``segments.causal()`` for the causal
    baseline). Differentiable."""
    if is_hooked_transformer(model):
        return hooked.run_masked(model, segments, **kwargs)
    return run_masked(model, segments.tokens, segments.mask(), segments.position_ids, **kwargs)


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    get = getattr(past, "get_seq_length", None)
    return int(get()) if callable(get) else 1


def check_segments(model: Any, segments: Any) -> Segments:
    """``segments`` fits ``model``: its length within n_ctx, its ids inside the vocabulary (checked
    here, before any embedding)."""
    if not isinstance(segments, Segments):
        raise TLBackwardError(
            f"segments must be a tl_backward.segments.Segments (from from_blocks/from_delimiter/"
            f"from_chat), got {type(segments).__name__}", argument="segments")
    cfg = getattr(model, "cfg", None)
    n_ctx = getattr(cfg, "n_ctx", None)
    if n_ctx and segments.tokens.shape[1] > n_ctx:
        raise TLBackwardError(f"segments has {segments.tokens.shape[1]} positions, more than n_ctx={n_ctx}",
                              argument="segments")
    checks.token_tensor(segments.tokens, "segments", getattr(cfg, "d_vocab", None))
    return segments


@checks.single_use
def segment_mask(model: Any, segments: Segments) -> Iterator[Segments]:
    """Run every forward pass of ``model`` inside the block under the MAS mask of ``segments``.

    Forward passes must be given exactly ``segments.tokens`` (same shape and ids; pass them as a
    tensor). Anything else -- other tokens, a string that tokenises differently, a conflicting
    ``attention_mask``, a KV-cache step -- raises ``TLBackwardError`` instead of silently applying a
    wrong mask. Position ids ``(cumsum(valid) - 1).clamp(min=0)`` are injected too (needed with left
    padding). On sliding-window layers the mask is the segment mask AND the layer's own window
    (``families.py``), so cached decoding (:func:`mas_generate`) agrees with it. On exit (also after an exception) the hook is removed and the model is exactly causal.
    Each object returned by ``segment_mask(...)`` can be entered once.

    ``model``: a reconstructing TransformerBridge, or a ``transformer_lens.HookedTransformer``
    (TransformerLens 3.x): there every layer's causal mask gives way to the segment mask (AND a
    local layer's window) and each call gets ``attention_mask=segments.valid``, from which the
    model derives the same positions (``hooked.py``).

    Example::

        seg = tl_backward.segments.from_blocks(model, ["the cat sat", "where is the cat ?"], "on the mat")
        with tl_backward.segment_mask(model, seg):
            logits, cache = model.run_with_cache(seg.tokens)
    """
    hf = forward_module(model)
    segments = check_segments(model, segments)
    # Held before the nesting check, so another thread waits here instead of seeing _ACTIVE.
    with model_lock(model):
        if model in _ACTIVE:
            raise TLBackwardError("segment_mask contexts cannot be nested on the same model", argument="segments")
        _ACTIVE.add(model)
        try:
            if hf is model:  # a HookedTransformer: its causal masks lifted for the block (hooked.py)
                with hooked.lifted(model, segments.to(input_device(model))):
                    yield segments
            else:
                yield from _masked(model, hf, segments)
        finally:
            _ACTIVE.discard(model)


def _masked(model: Any, hf: torch.nn.Module, segments: Segments) -> Iterator[Segments]:
    """:func:`segment_mask`'s block on a Bridge: the pre-hook on its HF module lives from the yield to its end."""
    device = input_device(hf)
    seg = segments.to(device)
    # The HF-level mask (windowed per layer, in the family's format: families.py) and positions
    # counting real tokens (always given: OPT derives positions from a 2-D mask only).
    keep = hf_attention_mask(model, seg.mask())
    positions = seg.position_ids

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = args[0] if args else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise TLBackwardError("segment_mask: forward called without input_ids or inputs_embeds",
                                  argument="input")
        if _cache_len(kwargs.get("past_key_values")) > 0:
            raise TLBackwardError(
                "segment_mask: a KV-cache decode step cannot use the prefill mask; "
                "use tl_backward.mas_generate for MAS generation", argument="past_key_values")
        if ids is not None:
            if ids.shape != seg.tokens.shape or not torch.equal(ids.to(device), seg.tokens):
                raise TLBackwardError(
                    f"segment_mask: this forward got tokens of shape {tuple(ids.shape)} that differ from "
                    f"the segments' tokens {tuple(seg.tokens.shape)}; pass segments.tokens exactly "
                    "(or leave the segment_mask context for other inputs)", argument="input")
        elif tuple(embeds.shape[:2]) != tuple(seg.tokens.shape):
            raise TLBackwardError(
                f"segment_mask: inputs_embeds of shape {tuple(embeds.shape)} do not match the "
                f"segments' tokens {tuple(seg.tokens.shape)}", argument="inputs_embeds")
        given = kwargs.get("attention_mask")
        if given is not None:
            if given.ndim != 2 or not torch.equal(given.to(device).bool(), seg.valid):
                raise TLBackwardError(
                    "segment_mask: an explicit attention_mask conflicts with the segment mask; "
                    "pass none (the segments' padding mask is used)", argument="attention_mask")
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = keep
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = positions
        return args, kwargs

    handle = hf.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield segments
    finally:
        handle.remove()


def attention_patterns(
    model: Any, segments: Segments, *, layers: int | Sequence[int] | None = None, mask: str = "mas",
) -> Float[Tensor, "layer batch head query_pos key_pos"]:
    """Attention patterns of ``segments`` under the MAS mask (``mask="mas"``) or plain causal
    attention with the same padding and positions (``mask="causal"``), fp32, no grad."""
    checks.one_of(mask, "mask", ("mas", "causal"))
    ad = get_adapter(model)
    names = [ad.hook_name("pattern", layer) for layer in ad.layers(layers)]
    hf = forward_module(model)
    seg = check_segments(model, segments).to(input_device(hf))
    with torch.no_grad():
        if mask == "mas":
            with segment_mask(model, seg):
                _, cache = model.run_with_cache(seg.tokens, names_filter=names)
        elif hf is model:  # a HookedTransformer: its causal mask, with the same padding and positions
            _, cache = model.run_with_cache(seg.tokens, names_filter=names, attention_mask=seg.valid.long())
        else:
            with hf_mask(model, seg.causal().mask(), seg.position_ids):
                _, cache = model.run_with_cache(seg.tokens, names_filter=names, attention_mask=seg.causal().mask(),
                                                position_ids=seg.position_ids)
    return torch.stack([cache[n].float().cpu() for n in names])
