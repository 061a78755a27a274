"""``mas_generate``: prefill once under the MAS mask, then decode causally from the KV cache.

``bridge.generate()`` rejects 4-D masks, so the loop is manual: a prefill call with the 4-D keep-mask
and explicit position ids returns ``(logits, past_key_values)``; each decode step feeds one token per
row with the cache, a running 2-D padding mask over all columns so far (HF adds the causal part) and
its absolute position ``n_real_prompt_tokens + step``. Columns are shared by the batch, so with
right padding the pads sit between a short prompt and its answer: they stay masked as keys and the
position ids skip them.

On a ``transformer_lens.HookedTransformer`` the same loop runs with TransformerLens's own KV cache
(``hooked.generate``): the prefill under the segment mask, every decode step causal.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from tl_backward.core.device import input_device, on

from ..core import checks
from ..core.compat import is_hooked_transformer
from ..core.lock import model_lock
from ..core.tokens import pad_token_id
from ..errors import TLBackwardError
from . import hooked
from .batch import Segments
from .context import check_segments, forward_module
from .decode import decode_loop
from .families import run_masked


@dataclass(frozen=True)
class Generation:
    """Output of :func:`mas_generate`.

    Attributes:
        prompt: the input :class:`Segments`.
        new_tokens: Int[Tensor, "batch new"] — generated ids (pad id after a row's EOS).
        new_valid: Bool[Tensor, "batch new"] — False after a row finished.
    """

    prompt: Segments
    new_tokens: Int[Tensor, "batch new"]
    new_valid: Bool[Tensor, "batch new"]

    def __repr__(self) -> str:
        B, N = self.new_tokens.shape
        return (f"Generation({B} rows, prompt {self.prompt.tokens.shape[1]} tokens, {N} decoding steps, "
                f"{int(self.new_valid.sum())} new tokens kept)")

    @property
    def full(self) -> Segments:
        """Prompt plus generated tokens (causal, padding after EOS masked) as one Segments."""
        return self.prompt.append(self.new_tokens, self.new_valid)

    def text(self, model: Any) -> list[str]:
        """Decoded generated text per row (tokens after EOS dropped)."""
        tok = model.tokenizer
        return [tok.decode(row[ok].tolist()) for row, ok in zip(self.new_tokens, self.new_valid)]


@contextmanager
def _kv_cache_shim(model: Any) -> Iterator[None]:
    """Hand the HF decoder layer's ``cache=`` kwarg to the attention bridge as ``past_key_values``.

    Workaround (transformer-lens 4.3.0 with transformers >= 5.2x): decoder layers now pass the KV
    cache as ``cache=``, but the attention bridges only read ``past_key_values``/``layer_past``, so
    on Llama/Qwen2 bridges the cache stays empty and every cached decode step ignores the prompt
    (``bridge.generate(use_past_kv_cache=True)`` is affected too). The pre-hooks only copy the
    reference when ``past_key_values`` is absent, and are removed on exit.
    """

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs = dict(kwargs)
            kwargs["past_key_values"] = kwargs["cache"]
        return args, kwargs

    handles = [blk.attn.register_forward_pre_hook(pre_hook, with_kwargs=True) for blk in model.blocks]
    try:
        with warnings.catch_warnings():
            # The Bridge's documented decode kwarg is past_key_values; HF renamed it to cache.
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*")
            yield
    finally:
        for h in handles:
            h.remove()


def _pick(logits: Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)


def _last_real(valid: Tensor) -> Tensor:
    """Column of each row's last real token."""
    cols = torch.arange(valid.shape[1], device=valid.device)
    return torch.where(valid, cols, -1).max(-1).values


@torch.no_grad()
def mas_generate(
    model: Any,
    segments: Segments,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | None | str = "auto",
    seed: int | None = None,
) -> Generation:
    """Generate with a MAS prefill and causal, KV-cached decoding.

    Args:
        model: a reconstructing ``TransformerBridge`` or a ``transformer_lens.HookedTransformer``.
        segments: the prompts (left or right padded; their ``target`` is ignored).
        max_new_tokens: tokens to generate per row (an int >= 1; prompt + new tokens <= n_ctx).
        temperature: 0 = greedy (deterministic); a finite T > 0 samples from ``softmax(logits / T)``.
        top_k: keep only the k most likely tokens when sampling (1 <= k <= vocabulary size).
        eos_token_id: stop a row after this id (``"auto"`` = the tokenizer's EOS, None = never),
            a token id of the vocabulary.
        seed: an int >= 0 that seeds a private generator for sampling (the global RNG is untouched);
            None samples from torch's global RNG.

    Returns:
        :class:`Generation`. The model's weights, mode and hooks are untouched.
    """
    hf = forward_module(model)
    segments = check_segments(model, segments)
    vocab = int(model.cfg.d_vocab)
    max_new_tokens = checks.count(max_new_tokens, "max_new_tokens", minimum=1)
    temperature = checks.finite_float(temperature, "temperature", minimum=0.0, hint="0 = greedy")
    top_k = checks.count(top_k, "top_k", minimum=1, maximum=vocab, none_ok=True)
    seed = checks.count(seed, "seed", none_ok=True, hint="seeds the sampling generator")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    batch, length = segments.tokens.shape
    if n_ctx and length + max_new_tokens > n_ctx:
        raise TLBackwardError(
            f"prompt ({length} columns) + max_new_tokens ({max_new_tokens}) exceeds n_ctx={n_ctx}",
            argument="max_new_tokens")
    tok = getattr(model, "tokenizer", None)
    if isinstance(eos_token_id, str) and eos_token_id == "auto":
        eos_token_id = getattr(tok, "eos_token_id", None)
    else:
        eos_token_id = checks.count(eos_token_id, "eos_token_id", maximum=vocab - 1, none_ok=True,
                                    hint="a token id, 'auto' or None")
    pad = pad_token_id(tok)
    device = input_device(hf)
    seg = segments.to(device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)

    def pick(logits: Tensor) -> Tensor:
        return _pick(logits, temperature, top_k, gen)

    if is_hooked_transformer(model):
        with model_lock(model):  # other threads wait (core/lock.py)
            return Generation(segments, *hooked.generate(model, seg, max_new_tokens, pick, eos_token_id, pad))
    with model_lock(model), _kv_cache_shim(model):  # other threads wait (core/lock.py)
        return Generation(segments, *_decode(model, seg, max_new_tokens, pick, eos_token_id, pad))


def _decode(model: Any, seg: Segments, max_new_tokens: int, pick: Callable[[Tensor], Tensor],
            eos_token_id: int | None, pad: int) -> tuple[Tensor, Tensor]:
    """The bridge's loop: a prefill under the 4-D mask fills HF's KV cache; each step feeds one token per
    row with the running 2-D padding mask and its absolute position (module docstring)."""
    batch, device = seg.tokens.shape[0], seg.device
    logits, cache = run_masked(model, seg.tokens, seg.mask(), seg.position_ids, return_type="logits_and_cache",
                               use_cache=True)  # MPT's config defaults to use_cache=False
    if cache is None or cache.get_seq_length() != seg.tokens.shape[1]:
        raise RuntimeError(
            "mas_generate: the prefill did not fill the KV cache (bridge/transformers version mismatch?)"
        )
    # Logits come from the unembedding's device (the last one of a dispatched model): sampled on the input's.
    next_logits = on(logits, device)[torch.arange(batch, device=device), _last_real(seg.valid)]
    state = {"running": seg.valid.long(), "cache": cache}
    n_real = seg.valid.sum(-1)

    def step(new: Tensor, i: int) -> Tensor:
        running = state["running"] = torch.cat([state["running"], torch.ones_like(state["running"][:, :1])], 1)
        logits, state["cache"] = model(
            new[:, None], attention_mask=running, position_ids=(n_real + i)[:, None],
            past_key_values=state["cache"], return_type="logits_and_cache", use_cache=True,
        )
        return on(logits[:, -1], device)

    return decode_loop(next_logits, step, max_new_tokens, pick, eos_token_id, pad)
