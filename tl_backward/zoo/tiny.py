"""Tiny random-weight models for tests, benchmarks and offline smoke runs.

Each family is built from an HF config (no download), wrapped with a small word-level
tokenizer, and booted as a reconstructing :class:`TransformerBridge` in eval mode. Random
weights are fine for exactness checks; they say nothing about behaviour (use the embedded
models from :mod:`tl_backward.zoo` for that).
"""

from __future__ import annotations

from typing import Any

import torch

from tl_backward.zoo.tokenizer import SPECIALS, build_tokenizer  # re-exported: ids <pad>=0 <bos>=1 <eos>=2 <unk>=3

from ..errors import BridgeUnavailable, TLBackwardError

FAMILIES = ("gpt2", "neox", "llama", "qwen2")

# A small vocabulary: enough words for natural-looking prompts in tests.
TINY_WORDS = (
    "the a an of is was to in on and or not . , ? : ! ### Q A "
    "cat dog mat sat ran big small red blue green paris france rome italy berlin germany "
    "capital city country language speaks lives works as doctor teacher one two three four "
    "five six seven eight nine ten hot cold up down good bad yes no when where who what"
).split()


def word_tokenizer(words: tuple[str, ...] | list[str] = TINY_WORDS, *, name: str = "tiny-words"):
    """A whitespace/punctuation-split WordLevel tokenizer usable by TransformerLens.

    Ids: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then ``words`` in order.
    ``name_or_path`` and ``add_bos_token`` are set because TL's BOS handling reads them.
    Built by :func:`tl_backward.zoo.tokenizer.build_tokenizer` (``"###"`` stays one token).
    """
    return build_tokenizer(words, name=name)


def hf_config(family: str, *, vocab_size: int, **overrides: Any):
    """An HF config for ``family`` with tiny defaults (2 layers, width 32, 4 heads)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    n_layers = overrides.pop("n_layers", 2)
    d_model = overrides.pop("d_model", 32)
    n_heads = overrides.pop("n_heads", 4)
    n_ctx = overrides.pop("n_ctx", 64)
    d_mlp = overrides.pop("d_mlp", 4 * d_model)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=n_ctx,
                         n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif family == "neox":
        cfg = GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                            intermediate_size=d_mlp, max_position_embeddings=n_ctx, rotary_pct=0.5,
                            use_parallel_residual=True, **common)
    elif family in ("llama", "qwen2"):
        kv = overrides.pop("n_kv_heads", max(1, n_heads // 2))
        cls = LlamaConfig if family == "llama" else Qwen2Config
        cfg = cls(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                  num_key_value_heads=kv, intermediate_size=d_mlp, max_position_embeddings=n_ctx,
                  tie_word_embeddings=False, **common)
    else:
        raise TLBackwardError(f"family must be one of {FAMILIES}, got {family!r}", argument="family")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_hf_model(family: str = "gpt2", *, seed: int = 0, vocab_size: int | None = None, **overrides: Any):
    """A random HF causal LM of ``family`` in eval mode, fp32."""
    from transformers import AutoModelForCausalLM

    vocab_size = vocab_size or len(SPECIALS) + len(TINY_WORDS)
    torch.manual_seed(seed)
    cfg = hf_config(family, vocab_size=vocab_size, **overrides)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_model(family: str = "gpt2", *, seed: int = 0, vocab_size: int | None = None, **overrides: Any):
    """A reconstructing ``TransformerBridge`` around a random tiny HF model (eval mode, fp32).

    ``overrides`` accepts ``n_layers``, ``d_model``, ``n_heads``, ``n_kv_heads``, ``n_ctx``,
    ``d_mlp`` and any raw HF config attribute. The HF model stays reachable as
    ``bridge.original_model`` for independent autograd checks. On TransformerLens 2.x (no
    ``transformer_lens.model_bridge``) it raises :class:`~tl_backward.errors.BridgeUnavailable`;
    :func:`tiny_hf_model` works everywhere.
    """
    try:  # imported here, not at the top: the zoo (below core) must import on TransformerLens 2.x too
        from transformer_lens.model_bridge import TransformerBridge
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("transformer_lens"):
            raise
        raise BridgeUnavailable("tiny_model") from None

    hf = tiny_hf_model(family, seed=seed, vocab_size=vocab_size, **overrides)
    bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=hf, tokenizer=word_tokenizer())
    return bridge.eval()
