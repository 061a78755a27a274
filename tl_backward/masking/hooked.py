"""MAS on a ``transformer_lens.HookedTransformer`` (TransformerLens 3.x): causality lifted per
layer, the segment keep-mask applied where the causal mask was.

A HookedTransformer has no Hugging Face module to hand a 4-D mask to (the Bridge route,
``context.py``). Its attention applies causality itself: ``AbstractAttention.forward`` calls
``self.apply_causal_mask(scores, past_kv_pos_offset, attention_mask)`` right before
``hook_attn_scores``, which returns ``where(causal ∧ window ∧ key_valid, scores, -inf)``. In
TransformerLens 3.9 that mask is built per call (``_make_causal_mask``; the ``mask`` buffer is an
empty placeholder), so there is no buffer to swap. While :func:`lifted` is open, every layer's
``apply_causal_mask`` is shadowed by an instance attribute returning

    where(keep[b, 0, i, j] ∧ (j > i − W on a local layer of window W), scores, IGNORE)

(a query with no allowed key -- a left pad -- keeps its diagonal instead, see :func:`_masked_scores`)

-- the same op at the same place: ``hook_attn_scores`` sees ``-inf`` wherever the segment mask
bans, the gradient is zero there, and a keep-mask equal to the causal one gives bit-identical
logits at every real token. On exit the attributes are deleted, so the class method shows through again.

Positions: a HookedTransformer reads them from its 2-D padding ``attention_mask`` -- the positional
embedding and rotary both use ``get_offset_position_ids`` = ``(cumsum(mask) − 1).clamp(min=0)``,
the Bridge convention (``Segments.position_ids``) -- so a forward pre-hook on the model passes
``attention_mask=segments.valid`` to every call. (Pad tokens get a zero positional embedding,
TransformerLens's own choice; no real token attends to them.) ALiBi adds the model's own
column-distance bias, 0 above the diagonal (``create_alibi_slope``), so :func:`generate` refuses
right-padded prompts there: the pad columns would sit between a prompt and its answer.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_backward.core.device import on

from ..core.compat import TransformerLensKeyValueCache
from ..core.lock import model_lock
from ..errors import TLBackwardError
from .batch import Segments
from .decode import decode_loop
from .families import windowed

__all__ = ["check_model", "generate", "lifted", "run_masked"]

_OVERRIDE = "apply_causal_mask"  # the AbstractAttention method shadowed while a mask is active


def check_model(model: Any) -> None:
    """Refuse HookedTransformers MAS cannot apply to (bidirectional attention: nothing to lift)."""
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        direction = getattr(attn, "_attention_dir_override", None) or model.cfg.attention_dir
        if direction != "causal" or not callable(getattr(type(attn), _OVERRIDE, None)):
            raise TLBackwardError(
                f"MAS needs causal attention; layer {layer} of this HookedTransformer attends "
                f"{direction!r} (cfg.attention_dir), so there is no causal mask to lift", argument="model")


def _check_padding(attention_mask: Tensor | None, valid: Bool[Tensor, "batch pos"]) -> None:
    """A forward's padding mask must be the segments' own: positions are derived from it."""
    if attention_mask is None:
        if not bool(valid.all()):
            raise TLBackwardError(
                "segment_mask: this forward got no attention_mask, so the HookedTransformer would count pad "
                "tokens as positions; call the model (model(tokens), run_with_cache, ...), which passes the "
                "segments' padding mask, or pass attention_mask=segments.valid", argument="attention_mask")
        return
    if tuple(attention_mask.shape) != tuple(valid.shape) or not torch.equal(on(attention_mask, valid).bool(), valid):
        raise TLBackwardError(
            "segment_mask: an explicit attention_mask conflicts with the segment mask; pass none "
            "(the segments' padding mask is used)", argument="attention_mask")


def _check_tokens(ids: Any, tokens: Int[Tensor, "batch pos"]) -> None:
    if not isinstance(ids, Tensor) or tuple(ids.shape) != tuple(tokens.shape) or not torch.equal(on(ids, tokens),
                                                                                               tokens):
        shown = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise TLBackwardError(
            f"segment_mask: this forward got tokens {shown} that differ from the segments' tokens "
            f"{tuple(tokens.shape)}; pass segments.tokens exactly, as a tensor (or leave the segment_mask "
            "context for other inputs)", argument="input")


def _masked_scores(attn: Any, keep: Bool[Tensor, "batch 1 query_pos key_pos"], valid: Bool[Tensor, "batch pos"],
                   ) -> Callable[..., Tensor]:
    """The stand-in for ``attn.apply_causal_mask``: ``where(keep ∧ window, scores, IGNORE)``."""
    window = attn.cfg.window_size if attn.attn_type == "local" else None
    keep = windowed(keep, window)
    # A left pad has no key it may attend to: its all -inf row would be a NaN softmax (zeroed by
    # TransformerLens, but still NaN in the gradient at hook_attn_scores, e.g. in RA maps). It
    # attends to itself instead; pad rows only, no real token ever sees a pad.
    lone = ~keep.any(-1, keepdim=True) & torch.eye(keep.shape[-1], dtype=torch.bool, device=keep.device)
    keep = on(keep | lone, attn.IGNORE)  # the layer's device (split models)
    checked: list[Tensor] = []  # HookedTransformer hands every layer the same mask tensor: check it once

    def apply_causal_mask(attn_scores: Tensor, past_kv_pos_offset: int = 0,
                          attention_mask: Tensor | None = None) -> Tensor:
        if past_kv_pos_offset:
            raise TLBackwardError(
                "segment_mask: a KV-cache decode step cannot use the prefill mask; "
                "use tl_backward.mas_generate for MAS generation", argument="past_kv_cache")
        if attn_scores.shape[0] != keep.shape[0] or tuple(attn_scores.shape[-2:]) != tuple(keep.shape[-2:]):
            raise TLBackwardError(
                f"segment_mask: attention over {tuple(attn_scores.shape[-2:])} query × key positions in a batch of "
                f"{attn_scores.shape[0]} does not match the segments' {tuple(valid.shape)}; pass segments.tokens "
                "exactly", argument="input")
        if not (checked and checked[0] is attention_mask):
            _check_padding(attention_mask, valid)
            checked[:] = [attention_mask]
        return torch.where(on(keep, attn_scores), attn_scores, on(attn.IGNORE, attn_scores))

    return apply_causal_mask


def _call_hook(model: Any, segments: Segments) -> Callable[..., tuple[tuple, dict]]:
    """Forward pre-hook on the HookedTransformer: the input must be the segments' tokens (a
    ``start_at_layer`` residual is checked by shape at the attention), and the padding mask is
    ``segments.valid`` (given by the hook when the call passes none)."""
    signature = inspect.signature(model.forward)
    valid = segments.valid.long()

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("start_at_layer") is None:
            _check_tokens(bound.arguments.get("input"), segments.tokens)
        if bound.arguments.get("attention_mask") is None:
            bound.arguments["attention_mask"] = valid
        else:
            _check_padding(bound.arguments["attention_mask"], segments.valid)
        return bound.args, bound.kwargs

    return pre_hook


@contextmanager
def lifted(model: Any, segments: Segments) -> Iterator[None]:
    """While open, every attention layer of ``model`` (a checked HookedTransformer) masks its
    scores with ``segments.mask()`` instead of the causal mask, and every call of the model gets
    ``attention_mask=segments.valid``; ``segments`` must already be on the model's input device.
    The caller holds ``model_lock(model)``. On exit (also after an exception) the model is causal
    again: the shadowing attributes and both forward pre-hooks (model, ``embed``) are removed.
    """
    attns = [block.attn for block in model.blocks]
    if any(_OVERRIDE in vars(attn) for attn in attns):
        raise TLBackwardError(
            "a segment mask is already active on this model (an open segment_mask block?); MAS masks "
            "cannot be nested: leave the block first", argument="segments")
    keep, valid = segments.mask(), segments.valid
    handles = [model.register_forward_pre_hook(_call_hook(model, segments), with_kwargs=True),
               # model.forward called directly (HookedTransformer.generate does) skips the hook above
               model.embed.register_forward_pre_hook(lambda module, args: _check_tokens(args[0], segments.tokens))]
    try:
        for attn in attns:
            # A plain instance attribute: nn.Module.__setattr__ stores functions in __dict__,
            # where they shadow the class's method for this module only.
            setattr(attn, _OVERRIDE, _masked_scores(attn, keep, valid))
        yield
    finally:
        for attn in attns:
            vars(attn).pop(_OVERRIDE, None)
        for handle in handles:
            handle.remove()


def run_masked(model: Any, segments: Segments, **kwargs: Any) -> Any:
    """``model(segments.tokens, attention_mask=segments.valid, **kwargs)`` under the keep-mask
    ``segments.mask()`` (pass ``segments.causal()`` for the causal baseline), ``segments`` on the
    model's input device. Differentiable; holds the model's lock for the call."""
    with model_lock(model), lifted(model, segments):
        return model(segments.tokens, attention_mask=segments.valid.long(), **kwargs)


def _check_alibi_padding(model: Any, segments: Segments) -> None:
    trailing_pad = ~segments.valid & segments.valid.long().cummax(-1).values.bool()
    if model.cfg.positional_embedding_type == "alibi" and bool(trailing_pad.any()):
        raise TLBackwardError(
            "mas_generate on an ALiBi HookedTransformer needs left padding: ALiBi's bias counts columns, so pad "
            "columns after a prompt would sit between it and its answer; build the prompts with "
            "padding_side='left'", argument="segments")


@torch.no_grad()
def generate(model: Any, segments: Segments, max_new_tokens: int, pick: Callable[[Tensor], Tensor],
             eos_token_id: int | None, pad: int) -> tuple[Int[Tensor, "batch new"], Bool[Tensor, "batch new"]]:
    """``mas_generate``'s loop on a HookedTransformer: one prefill of ``segments`` (on the input
    device) under its MAS mask fills TransformerLens's KV cache (keys, values and the padding mask
    ``valid``); then each step feeds one token per row, causally, outside the mask: the cache
    appends a 1 to the padding mask, so the step attends to every real prompt token and every
    earlier new one, at position ``n_real + step`` (``(cumsum(mask) − 1)`` of the cached mask).
    ``pick(logits [batch, vocab]) -> ids [batch]`` chooses each token. The caller holds the lock.

    Returns ``(new_tokens, new_valid)`` on the CPU (pad id and False after a row's EOS).
    """
    _check_alibi_padding(model, segments)
    batch, device = segments.tokens.shape[0], segments.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch)
    with lifted(model, segments):
        logits = model(segments.tokens, attention_mask=segments.valid.long(), past_kv_cache=cache)
    cols = torch.arange(segments.tokens.shape[1], device=device)
    last = torch.where(segments.valid, cols, -1).max(-1).values  # each row's last real column
    next_logits = on(logits, device)[torch.arange(batch, device=device), last]
    one = torch.ones(batch, 1, dtype=torch.long, device=device)

    def step(new: Tensor, i: int) -> Tensor:  # the cache appends ``one`` to its padding mask
        return on(model(new[:, None], attention_mask=one, past_kv_cache=cache)[:, -1], device)
    return decode_loop(next_logits, step, max_new_tokens, pick, eos_token_id, pad)
